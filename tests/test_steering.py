"""Tests of starctl.steering: --steer parsing, strength -> scale, classifier guidance inside
DPM-Solver++ with an analytic Gaussian denoiser, and plan probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from starctl import attributes
from starctl.attributes import AttributeInfo, user_attributes_dir
from starctl.errors import StarctlError
from starctl.heads import AttributeHead, HeadConfig, train_head
from starctl.latent import LatentSpace
from starctl.sampler import sample_dpmpp_2m
from starctl.schedule import alpha_sigma
from starctl.steering import (SteerTerm, attribute_guidance, parse_steer, parse_steer_specs, parse_steers,
                              plan_probabilities, resolve_steering, steering_terms)

SPACE = LatentSpace("toy", 8, 0.0, 1.0)
INFOS = [
    AttributeInfo("sentiment", ["positive", "negative"], "builtin", None),
    AttributeInfo("topic", ["business", "entertainment", "politics", "sport", "tech"], "builtin", None),
    AttributeInfo("toxicity", ["toxic", "non-toxic"], "builtin", None),
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STARCTL_ATTRIBUTES", raising=False)
    monkeypatch.setattr(attributes.importlib.metadata, "entry_points", lambda group=None: [])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("positive=0.8", ("positive", 0.8)),
    (" negative = -0.5 ", ("negative", -0.5)),
    ("sport=1", ("sport", 1.0)),
    ("toxic=-1.0", ("toxic", -1.0)),
    ("sentiment:positive=0", ("sentiment:positive", 0.0)),
    ("tech=1e-1", ("tech", 0.1)),
])
def test_parse_steer_ok(spec, expected):
    assert parse_steer(spec, INFOS) == expected


@pytest.mark.parametrize("spec, match", [
    ("positive", "malformed steer 'positive': write LABEL=STRENGTH"),
    ("=0.5", "malformed steer"),
    ("positive=", "malformed steer"),
    ("", "malformed steer"),
    ("positive=high", "strength 'high' is not a number"),
    ("positive=0.8=1", "is not a number"),
    ("positive=nan", "finite number"),
    ("positive=inf", "finite number"),
    ("positive=1.5", "outside \\[-1, 1\\]"),
    ("negative=-1.01", "outside \\[-1, 1\\]"),
    ("postive=0.5", "unknown label 'postive': valid labels are positive, negative \\(sentiment\\); business"),
    ("topic:positive=0.5", "unknown label 'positive' of attribute 'topic'"),
    ("mood:happy=0.5", "unknown attribute 'mood'"),
])
def test_parse_steer_errors(spec, match):
    with pytest.raises(StarctlError, match=match) as e:
        parse_steer(spec, INFOS)
    assert "\n" not in str(e.value)


def test_parse_steers_multiple_and_comma_separated():
    assert parse_steers(["positive=0.8", "sport=0.5,tech=0.3", "toxic=-1"], INFOS) == [
        ("positive", 0.8), ("sport", 0.5), ("tech", 0.3), ("toxic", -1.0)]
    assert parse_steers(["sport=0.5", "business=-0.5"], INFOS) == [("sport", 0.5), ("business", -0.5)]
    assert parse_steer_specs(["positive=0.8", "sport=0.2"], INFOS) == {"positive": 0.8, "sport": 0.2}
    assert parse_steers([], INFOS) == []


@pytest.mark.parametrize("specs, match", [
    (["positive=0.8", "negative=0.2"], "'positive=0.8' and 'negative=0.2' are both labels of the binary attribute 'sentiment'"),
    (["toxic=-0.5,non-toxic=0.5"], "binary attribute 'toxicity'"),
    (["positive=0.8", "positive=0.3"], "label 'positive' is steered twice"),
    (["sport=0.5", "topic:sport=0.5"], "steered twice"),
    (["positive=0.8,"], "empty item between commas"),
    (["positive=0.8", "sport=2"], "outside"),
])
def test_parse_steers_errors(specs, match):
    with pytest.raises(StarctlError, match=match) as e:
        parse_steers(specs, INFOS)
    assert "\n" not in str(e.value)


def test_parse_steer_uses_the_registry_by_default():
    assert parse_steer("positive=0.8") == ("positive", 0.8)
    with pytest.raises(StarctlError, match="valid labels are .*toxic, non-toxic \\(toxicity\\)"):
        parse_steer("happy=0.8")
    with pytest.raises(StarctlError, match="binary attribute 'sentiment'"):
        parse_steers(["positive=1", "negative=1"])


# --- strength -> scale -----------------------------------------------------------------------

def toy_head(labels=("positive", "negative"), name="sentiment", seed=0, max_scale=4.0, space=SPACE):
    torch.manual_seed(seed)
    cfg = HeadConfig(name=name, labels=list(labels), latent=space, width=16, depth=1, max_scale=max_scale)
    return AttributeHead(cfg).eval()


def test_resolve_steering_scales_by_max_scale():
    heads = {"sentiment": toy_head(max_scale=2.0),
             "topic": toy_head(INFOS[1].labels, "topic", max_scale=5.0)}
    asked = []

    def head_for(attr):
        asked.append(attr)
        return heads[attr]

    terms = resolve_steering({"negative": -0.5, "sport": 0.4, "tech": 0.0}, head_for, INFOS)
    assert [(t.attribute, t.label, t.scale) for t in terms] == [("sentiment", "negative", -1.0), ("topic", "sport", 2.0)]
    assert terms[1].index == 3 and set(asked) == {"sentiment", "topic"}
    same = resolve_steering(["negative=-0.5", "sport=0.4"], head_for, INFOS)
    assert [(t.label, t.scale) for t in same] == [("negative", -1.0), ("sport", 2.0)]
    with pytest.raises(StarctlError, match="binary"):
        resolve_steering([("positive", 0.5), ("negative", 0.5)], head_for, INFOS)


def test_steering_terms_loads_fitting_heads_from_the_registry():
    toy_head(max_scale=2.0).save_pretrained(user_attributes_dir() / "sentiment" / "head")
    terms = steering_terms(["positive=0.8"], SPACE)
    assert len(terms) == 1 and terms[0].label == "positive" and math.isclose(terms[0].scale, 1.6)
    with pytest.raises(StarctlError, match="another latent space"):
        steering_terms(["positive=0.8"], LatentSpace("toy", 8, 0.0, 2.0))


# --- guidance ------------------------------------------------------------------------------------

def gaussian_denoiser(mu: torch.Tensor, s: torch.Tensor):
    """Exact v-prediction for x ~ N(mu, diag(s^2)) (see tests/test_sampler.py)."""

    def denoise(z, logsnr):
        alpha, sigma = (a[:, None] for a in alpha_sigma(logsnr))
        var = alpha**2 * s**2 + sigma**2
        x0 = mu + alpha * s**2 * (z - alpha * mu) / var
        eps = sigma * (z - alpha * mu) / var
        return alpha * eps - sigma * x0

    return denoise


@pytest.fixture(scope="module")
def sign_head():
    """A head trained on x ~ N(0, I) (8-d) labelled by the sign of x_0 + x_1."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    labels = ["positive" if v > 0 else "negative" for v in (x[:, 0] + x[:, 1]).tolist()]
    head, report = train_head([f"t{i}" for i in range(2000)], labels, SPACE, None, embeddings=x,
                              label_order=["positive", "negative"], name="sentiment", epochs=4,
                              batch_size=64, width=32, depth=2, lr=3e-3, probe=False)
    assert report.head_accuracy[1.0] > 0.9
    return head


def mean_log_p(head, plan, label=0):
    with torch.no_grad():
        return head.log_probs(plan.float(), torch.ones(plan.shape[0]))[:, label].mean().item()


def test_guidance_increases_log_p_of_sampled_plans(sign_head):
    denoiser = gaussian_denoiser(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    noise = torch.randn(128, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = sample_dpmpp_2m(denoiser, noise, steps=20)
    toward = sample_dpmpp_2m(denoiser, noise, steps=20, guidance=[attribute_guidance([(sign_head, "positive", 4.0)])])
    away = sample_dpmpp_2m(denoiser, noise, steps=20, guidance=[attribute_guidance([(sign_head, "positive", -4.0)])])
    base = mean_log_p(sign_head, plain)
    assert mean_log_p(sign_head, toward) > base + 0.2
    assert mean_log_p(sign_head, away) < base - 0.2
    frac = lambda p: ((p[:, 0] + p[:, 1]) > 0).double().mean().item()  # noqa: E731 - the true rule
    assert frac(toward) > frac(plain) + 0.15 and frac(away) < frac(plain) - 0.15
    assert toward.dtype == torch.float64 and torch.isfinite(toward).all()
    assert toward.norm(dim=1).mean() < 3 * plain.norm(dim=1).mean()     # steered, not blown up


def test_guidance_formula_batching_and_no_param_grads(sign_head):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 8, generator=g, dtype=torch.float64)
    logsnr = torch.linspace(-4, 4, 6, dtype=torch.float64)
    eps_hat = torch.randn(6, 8, generator=g, dtype=torch.float64)
    guide = attribute_guidance([SteerTerm(sign_head, "negative", 2.5)])
    with torch.no_grad():
        out = guide(z, logsnr, eps_hat)
    # by hand
    zz = z.float().clone().requires_grad_(True)
    a2 = torch.sigmoid(logsnr).float()
    (grad,) = torch.autograd.grad(sign_head.log_probs(zz, a2)[:, 1].sum(), zz)
    expected = eps_hat - torch.sigmoid(-logsnr).sqrt()[:, None] * 2.5 * grad.double()
    assert torch.allclose(out, expected, atol=1e-6)
    # batched == one sample at a time
    rows = torch.cat([guide(z[i:i + 1], logsnr[i:i + 1], eps_hat[i:i + 1]) for i in range(6)])
    assert torch.allclose(out, rows, atol=1e-6)
    assert all(p.grad is None for p in sign_head.parameters())
    # no terms: identity
    assert torch.equal(attribute_guidance([])(z, logsnr, eps_hat), eps_hat)


def test_terms_add_and_share_one_head_pass():
    topic = toy_head(INFOS[1].labels, "topic", seed=3)
    senti = toy_head(seed=4)
    g = torch.Generator().manual_seed(5)
    z, eps = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    logsnr = torch.zeros(4)
    parts = [(topic, "sport", 1.5), (topic, 4, -0.5), (senti, "positive", 2.0)]
    together = attribute_guidance(parts)(z, logsnr, eps)
    separate = sum(attribute_guidance([p])(z, logsnr, eps) - eps for p in parts) + eps
    assert torch.allclose(together, separate, atol=1e-5)

    calls = []
    topic.register_forward_hook(lambda *a: calls.append(1))
    attribute_guidance(parts)(z, logsnr, eps)
    assert len(calls) == 1                       # two labels of one head: one forward pass
    with pytest.raises(StarctlError, match="has no label 'positive'"):
        attribute_guidance([(topic, "positive", 1.0)])
    with pytest.raises(StarctlError, match="no label index 9"):
        attribute_guidance([(topic, 9, 1.0)])


# --- probabilities ------------------------------------------------------------------------------

def test_plan_probabilities():
    senti, topic = toy_head(seed=1), toy_head(INFOS[1].labels, "topic", seed=2)
    review = toy_head(("positive", "mixed"), "review", seed=3)
    plan = torch.randn(3, 8)
    flat = plan_probabilities([senti, topic], plan)
    assert len(flat) == 3 and set(flat[0]) == {"positive", "negative", *INFOS[1].labels}
    assert math.isclose(flat[0]["positive"] + flat[0]["negative"], 1.0, rel_tol=1e-5)
    with torch.no_grad():
        expect = torch.softmax(senti(plan, torch.ones(3)), -1)[1, 0].item()
    assert math.isclose(flat[1]["positive"], expect, rel_tol=1e-5)
    clash = plan_probabilities([senti, review], plan)
    assert {"sentiment:positive", "review:positive", "negative", "mixed"} == set(clash[0])
    nested = plan_probabilities({"sentiment": senti, "topic": topic}, plan)
    assert set(nested[2]) == {"sentiment", "topic"}
    assert math.isclose(sum(nested[2]["topic"].values()), 1.0, rel_tol=1e-5)
    assert math.isclose(nested[1]["sentiment"]["positive"], expect, rel_tol=1e-5)
