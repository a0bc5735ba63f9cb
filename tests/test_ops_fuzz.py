"""Randomized inputs for the public noise and Grad-CAM ops: a valid call, changed by a few random
mutations, each either benign (a layout, a dtype, a map shape, a recipe the op accepts) or malformed
(a shape, dtype, value or argument the op must refuse). A call with a malformed mutation must raise
ValueError or TypeError naming one of the mutated arguments, nothing else; a call with only benign
ones must match the reference (the noise ops: the Triton kernels under the interpreter against
srdiff.reference with the same explicit ε; gradcam_reduce: the extension against its reference).

hypothesis runs derandomized (the same examples every run), 60 examples per noise op (the benign
ones run the Triton interpreter, about a second each) and 150 for gradcam_reduce: the tables of
tests/test_noise.py and tests/test_gradcam.py pin each message; this file looks for the combinations
those tables did not think of.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import srdiff
from srdiff import noise_extension
from srdiff import _extension
from srdiff.reference import amplified_add_noise_ref, amplified_noise_loss_ref, gradcam_reduce_ref
from srdiff_testing import assert_close, channels_last_like, strided

T = 1000
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _alphas_cumprod():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def _set(name, value):
    return lambda kw: kw.update({name: value(kw)})


def _first_nonfinite(t, value):
    t = t.clone()
    t[(0,) * t.dim()] = value
    return t


def _doubled(t, dim):
    """t with dimension ``dim`` twice as long: a shape that cannot match by chance."""
    return torch.cat([t, t], dim)


def _a_map(kw):
    return torch.rand(kw["x0"].shape[2:]) if kw["fam"] is None else kw["fam"]


def _seed_instead_of_noise(kw, seed):
    kw.pop("noise", None)
    kw["seed"] = seed


def _some_noise(kw):
    return kw.get("noise", torch.randn(3, 3, 6, 6))


def _checked_nonfinite(kw, name, value):
    """``kw[name]`` with a non-finite first value, checked; left alone where another mutation already made it
    something no value can be written into (a list, an integer or empty tensor)."""
    t = kw[name]
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
        kw.update({name: _first_nonfinite(t, value), "check_finite": True})


# Noise ops: name -> (change to the keyword arguments, arguments the error may name). Each change
# receives the valid kwargs and returns nothing.
NOISE_MALFORMED = {
    "x0-rank": (_set("x0", lambda kw: kw["x0"][0]), {"x0"}),
    "x0-float64": (_set("x0", lambda kw: kw["x0"].double()), {"x0"}),
    "x0-int": (_set("x0", lambda kw: kw["x0"].long()), {"x0"}),
    "x0-list": (_set("x0", lambda kw: kw["x0"].tolist()), {"x0"}),
    "x0-empty": (_set("x0", lambda kw: kw["x0"][:, :0]), {"x0"}),
    "t-float": (_set("timesteps", lambda kw: kw["timesteps"].float()), {"timesteps"}),
    "t-bool": (_set("timesteps", lambda kw: kw["timesteps"] > 0), {"timesteps"}),
    "t-length": (_set("timesteps", lambda kw: torch.cat([kw["timesteps"], kw["timesteps"]])), {"timesteps"}),
    "t-rank": (_set("timesteps", lambda kw: kw["timesteps"][:, None]), {"timesteps"}),
    "t-high": (_set("timesteps", lambda kw: torch.full_like(kw["timesteps"].long(), T)), {"timesteps"}),
    "t-negative": (_set("timesteps", lambda kw: torch.full_like(kw["timesteps"].long(), -3)), {"timesteps"}),
    "ac-zero": (_set("alphas_cumprod", lambda kw: torch.cat([kw["alphas_cumprod"][:-1], torch.zeros(1)])),
                {"alphas_cumprod"}),
    "ac-above-one": (_set("alphas_cumprod", lambda kw: kw["alphas_cumprod"] + 1), {"alphas_cumprod"}),
    "ac-nan": (_set("alphas_cumprod", lambda kw: _first_nonfinite(kw["alphas_cumprod"], float("nan"))),
               {"alphas_cumprod"}),
    "ac-half": (_set("alphas_cumprod", lambda kw: kw["alphas_cumprod"].half()), {"alphas_cumprod"}),
    "ac-rank": (_set("alphas_cumprod", lambda kw: kw["alphas_cumprod"][None]), {"alphas_cumprod"}),
    "fam-size": (lambda kw: kw.update(fam=torch.rand(kw["x0"].shape[2] + 1, kw["x0"].shape[3]), resize=False),
                 {"fam"}),
    "fam-batch": (_set("fam", lambda kw: torch.rand(kw["x0"].shape[0] + 1, *kw["x0"].shape[2:])), {"fam"}),
    "fam-channels": (_set("fam", lambda kw: torch.rand(kw["x0"].shape[0], 2, *kw["x0"].shape[2:])), {"fam"}),
    "fam-nan": (_set("fam", lambda kw: _first_nonfinite(_a_map(kw), float("nan"))), {"fam"}),
    "fam-inf": (_set("fam", lambda kw: _first_nonfinite(_a_map(kw), float("inf"))), {"fam"}),
    "fam-int": (_set("fam", lambda kw: (kw["fam"] * 10).long()), {"fam"}),
    "lam-nan": (_set("lam", lambda kw: float("nan")), {"lam"}),
    "lam-inf": (_set("lam", lambda kw: float("inf")), {"lam"}),
    "lam-negative": (_set("lam", lambda kw: -0.5), {"lam"}),
    "lam-bool": (_set("lam", lambda kw: True), {"lam"}),
    "lam-str": (_set("lam", lambda kw: "0.1"), {"lam"}),
    "seed-negative": (lambda kw: _seed_instead_of_noise(kw, -1), {"seed"}),
    "seed-huge": (lambda kw: _seed_instead_of_noise(kw, 2**63), {"seed"}),
    "seed-float": (lambda kw: _seed_instead_of_noise(kw, 1.0), {"seed"}),
    "recipe-name": (_set("recipe", lambda kw: "ddpm"), {"recipe"}),
    "recipe-pair": (_set("recipe", lambda kw: ("add", "mul")), {"recipe"}),
    "prediction-type": (_set("prediction_type", lambda kw: "x0"), {"prediction_type"}),
    "resize-int": (_set("resize", lambda kw: 1), {"resize"}),
    "backend": (_set("backend", lambda kw: "cuda"), {"backend"}),
    "noise-and-seed": (lambda kw: kw.update(noise=_some_noise(kw), seed=3), {"noise", "seed"}),
    "noise-shape": (_set("noise", lambda kw: _doubled(_some_noise(kw), 2)), {"noise", "seed"}),
    "noise-int": (_set("noise", lambda kw: _some_noise(kw).long()), {"noise", "seed"}),
}
LOSS_MALFORMED = {
    "pred-shape": (_set("pred", lambda kw: _doubled(kw["pred"], 2)), {"pred"}),
    "pred-float64": (_set("pred", lambda kw: kw["pred"].double()), {"pred"}),
    "reduction": (_set("reduction", lambda kw: "max"), {"reduction"}),
}
NOISE_BENIGN = {
    "x0-strided": _set("x0", lambda kw: strided(kw["x0"])),
    "x0-channels-last": _set("x0", lambda kw: channels_last_like(kw["x0"])),
    "x0-half": _set("x0", lambda kw: kw["x0"].half()),
    "x0-bfloat16": _set("x0", lambda kw: kw["x0"].bfloat16()),
    "t-int32": _set("timesteps", lambda kw: kw["timesteps"].int()),
    "t-uint8": _set("timesteps", lambda kw: (kw["timesteps"] % 256).to(torch.uint8)),
    "ac-float64": _set("alphas_cumprod", lambda kw: kw["alphas_cumprod"].double()),
    "fam-batch": _set("fam", lambda kw: torch.rand(kw["x0"].shape[0], *kw["x0"].shape[2:])),
    "fam-b1hw": _set("fam", lambda kw: torch.rand(kw["x0"].shape[0], 1, *kw["x0"].shape[2:])),
    "fam-half-strided": _set("fam", lambda kw: strided(kw["fam"].half())),
    "fam-none": _set("fam", lambda kw: None),
    "resize": lambda kw: kw.update(fam=torch.rand(3, 2), resize=True),
    "lam-zero": _set("lam", lambda kw: 0),
    "recipe-adm": _set("recipe", lambda kw: "adm"),
    "recipe-uvit": _set("recipe", lambda kw: "uvit"),
    "recipe-pair": _set("recipe", lambda kw: ("scale", "scale")),
    "v-prediction": _set("prediction_type", lambda kw: "v_prediction"),
    "sample": _set("prediction_type", lambda kw: "sample"),
}
LOSS_BENIGN = {
    "pred-bfloat16": _set("pred", lambda kw: kw["pred"].bfloat16()),
    "pred-strided": _set("pred", lambda kw: strided(kw["pred"])),
    "sum": _set("reduction", lambda kw: "sum"),
    "none": _set("reduction", lambda kw: "none"),
}


def _valid_noise_kwargs(data):
    shape = tuple(data.draw(st.integers(1, n), label=name) for name, n in zip("BCHW", (3, 3, 6, 6)))
    return dict(
        x0=torch.rand(shape) * 2 - 1,
        timesteps=torch.randint(0, T, (shape[0],)),
        alphas_cumprod=_alphas_cumprod(),
        noise=torch.randn(shape),
        fam=torch.rand(shape[2:]),
        lam=data.draw(st.floats(0.0, 1.0), label="lam"),
        pred=torch.randn(shape),
    )


def _mutate(data, kwargs, malformed, benign):
    """Apply 0-2 benign and, three times in four, 1-2 malformed changes; the names an error may carry."""
    for name in data.draw(st.lists(st.sampled_from(sorted(benign)), max_size=2, unique=True), label="benign"):
        benign[name](kwargs)
    names = set()
    if data.draw(st.sampled_from([True, True, True, False]), label="malformed?"):
        chosen = data.draw(st.lists(st.sampled_from(sorted(malformed)), min_size=1, max_size=2, unique=True),
                           label="malformed")
        for name in chosen:
            change, argument_names = malformed[name]
            change(kwargs)
            names |= argument_names
    return names


def _expect_clean_refusal(call, names):
    try:
        call()
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(name in message for name in names), f"{type(exc).__name__} names none of {names}: {message}"
    else:
        pytest.fail(f"accepted an input malformed in {names}")


def _reference_map(kwargs):
    """The map as the reference needs it: resized to (H, W) when the call asked for resize."""
    fam = kwargs["fam"]
    if fam is None or not kwargs.get("resize"):
        return fam
    H, W = kwargs["x0"].shape[2:]
    return F.interpolate(fam.reshape(-1, 1, *fam.shape[-2:]).float(), size=(H, W), mode="bilinear",
                         align_corners=False)[:, 0]


def _reference_kwargs(kwargs, *keys):
    out = {k: kwargs[k] for k in keys if k in kwargs}
    out["fam"] = _reference_map(kwargs)
    return out


# The kernels the noise fuzz tests draw from: Triton (interpreter) and, when built, srdiff._C's CPU kernels.
NOISE_KERNELS = ["triton"] + (["extension"] if noise_extension.available() else [])


@FUZZ
@given(data=st.data())
def test_amplified_add_noise_fuzz(data):
    kwargs = _valid_noise_kwargs(data)
    kwargs.pop("pred")
    names = _mutate(data, kwargs, NOISE_MALFORMED, NOISE_BENIGN)
    kwargs.setdefault("backend", data.draw(st.sampled_from(NOISE_KERNELS), label="backend"))
    if names:
        _expect_clean_refusal(lambda: srdiff.amplified_add_noise(**kwargs), names)
        return
    x_t, target = srdiff.amplified_add_noise(**kwargs)
    ref = _reference_kwargs(kwargs, "recipe", "prediction_type")
    x0 = kwargs["x0"]
    ref_x_t, ref_target = amplified_add_noise_ref(x0.float(), kwargs["timesteps"], kwargs["alphas_cumprod"],
                                                  kwargs["noise"], lam=kwargs["lam"], **ref)
    assert_close(x_t, ref_x_t, dtype=x0.dtype, name="x_t")
    assert_close(target, ref_target, dtype=x0.dtype, name="target")


@FUZZ
@given(data=st.data())
def test_amplified_noise_loss_fuzz(data):
    kwargs = _valid_noise_kwargs(data)
    names = _mutate(data, kwargs, {**NOISE_MALFORMED, **LOSS_MALFORMED}, {**NOISE_BENIGN, **LOSS_BENIGN})
    kwargs.setdefault("backend", data.draw(st.sampled_from(NOISE_KERNELS), label="backend"))
    if names:
        _expect_clean_refusal(lambda: srdiff.amplified_noise_loss(**kwargs), names)
        return
    pred = kwargs.pop("pred").detach().requires_grad_()
    loss = srdiff.amplified_noise_loss(pred, **kwargs)
    ref_pred = pred.detach().clone().requires_grad_()
    ref = _reference_kwargs(kwargs, "recipe", "prediction_type", "reduction", "noise")
    x0 = kwargs["x0"]
    expected = amplified_noise_loss_ref(ref_pred, x0.float(), kwargs["timesteps"], kwargs["alphas_cumprod"],
                                        lam=kwargs["lam"], **ref)
    reduce_dim = 1 if kwargs.get("reduction") == "none" else x0.numel()
    assert_close(loss, expected, dtype=torch.float32, reduce_dim=reduce_dim, name="loss")
    grad_out = torch.rand_like(expected)
    (grad,) = torch.autograd.grad(loss, pred, grad_out)
    (ref_grad,) = torch.autograd.grad(expected, ref_pred, grad_out)
    assert_close(grad, ref_grad, dtype=pred.dtype, pass_="bwd", name="grad_pred")


GRADCAM_MALFORMED = {
    "acts-rank": (_set("activations", lambda kw: kw["activations"][0]), {"activations"}),
    "acts-int": (_set("activations", lambda kw: kw["activations"].long()), {"activations"}),
    "acts-float64": (_set("activations", lambda kw: kw["activations"].double()), {"activations", "gradients"}),
    "acts-list": (_set("activations", lambda kw: kw["activations"].tolist()), {"activations"}),
    "acts-empty": (lambda kw: kw.update(activations=kw["activations"][:0], gradients=kw["gradients"][:0]),
                   {"activations"}),
    "grads-shape": (_set("gradients", lambda kw: _doubled(kw["gradients"], 1)), {"gradients"}),
    "grads-dtype": (_set("gradients", lambda kw: kw["gradients"].double()), {"gradients"}),
    "grads-nan": (lambda kw: _checked_nonfinite(kw, "gradients", float("nan")), {"gradients"}),
    "grads-inf": (lambda kw: _checked_nonfinite(kw, "gradients", float("-inf")), {"gradients"}),
    "acts-nan": (lambda kw: _checked_nonfinite(kw, "activations", float("nan")), {"activations"}),
    "acts-inf": (lambda kw: _checked_nonfinite(kw, "activations", float("-inf")), {"activations"}),
    "grads-meta": (_set("gradients", lambda kw: kw["gradients"].to("meta")), {"gradients"}),
    "size-zero": (_set("size", lambda kw: (0, 4)), {"size"}),
    "size-three": (_set("size", lambda kw: (4, 4, 4)), {"size"}),
    "size-float": (_set("size", lambda kw: (4.0, 4)), {"size"}),
    "backend": (_set("backend", lambda kw: "triton"), {"backend"}),
}
GRADCAM_BENIGN = {
    "strided": lambda kw: kw.update(activations=strided(kw["activations"]), gradients=strided(kw["gradients"])),
    "channels-last": lambda kw: kw.update(activations=channels_last_like(kw["activations"]),
                                          gradients=channels_last_like(kw["gradients"])),
    "half": lambda kw: kw.update(activations=kw["activations"].half(), gradients=kw["gradients"].half()),
    "bfloat16": lambda kw: kw.update(activations=kw["activations"].bfloat16(), gradients=kw["gradients"].bfloat16()),
    "resize": _set("size", lambda kw: (5, 9)),
    "raw": _set("normalize", lambda kw: False),
    "unchecked": _set("check_finite", lambda kw: False),
}


@pytest.mark.skipif(not _extension.HAS_EXT, reason=f"srdiff._C unavailable: {_extension.WHY_NOT}")
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_gradcam_reduce_fuzz(data):
    shape = tuple(data.draw(st.integers(1, n), label=name) for name, n in zip("BChw", (3, 9, 7, 7)))
    kwargs = dict(activations=torch.rand(shape), gradients=torch.randn(shape), size=None, normalize=True)
    names = _mutate(data, kwargs, GRADCAM_MALFORMED, GRADCAM_BENIGN)
    kwargs.setdefault("backend", "extension")
    if names:
        _expect_clean_refusal(lambda: srdiff.gradcam_reduce(**kwargs), names)
        return
    out = srdiff.gradcam_reduce(**kwargs)
    ref = gradcam_reduce_ref(kwargs["activations"], kwargs["gradients"], kwargs["size"], kwargs["normalize"])
    assert_close(out, ref, dtype=torch.float32, reduce_dim=shape[1] * shape[2] * shape[3])
