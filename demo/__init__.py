"""The Gradio demo of starctl (see demo/app.py; run it with `starctl demo`)."""
