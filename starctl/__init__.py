"""starctl: controllable text generation with STAR-LDM (stop, think, autoregress).

    from starctl import Star
    outs, result = Star.load().generate(["The movie was"], steer={"positive": 0.8})
"""

__version__ = "0.1.0"

from .errors import StarctlError  # noqa: E402

__all__ = ["Star", "StarctlError", "__version__"]


def __getattr__(name):
    # Lazy: importing the package must not load torch (the CLI stays quick to start).
    if name == "Star":
        from .api import Star

        return Star
    raise AttributeError(name)
