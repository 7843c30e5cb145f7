"""Shared test machinery: float64 ground truth, input factories and the tolerance table
used by every backend's tests."""

from __future__ import annotations

import torch

# Max |error| allowed, relative to max |ground truth| of the same tensor (forward output
# or gradient), per input dtype. fp16/bf16 bounds follow from storing x, U, V, y (and the
# fp32-accumulated intermediates) in 11- and 8-bit mantissas across a 3-GEMM chain.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 4e-2,
}

GRAD_NAMES = ("x", "U", "V", "sigma", "X", "Y", "bias")


def make_salt_inputs(lead, K, D, r, r_lora, dtype=torch.float32, *, bias=True, device="cpu",
                     seed=0, grad_basis=False, param_dtype=None):
    """Random SALT inputs: x (*lead, K), U (D, r), V (K, r) orthonormal-ish, sigma (r,),
    X (r, r'), Y (r', r) non-zero (so the X@Y path is exercised), bias (D,)."""
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    x = rnd(*lead, K)
    U = rnd(D, r, scale=D ** -0.5)
    V = rnd(K, r, scale=K ** -0.5)
    sigma = (torch.rand(r, generator=g, dtype=torch.float64) + 0.5).to(pdt).to(device)
    X = rnd(r, r_lora, scale=0.5, dt=pdt)
    Y = rnd(r_lora, r, scale=0.5, dt=pdt)
    b = rnd(D, scale=0.1) if bias else None
    tensors = dict(x=x, U=U, V=V, sigma=sigma, X=X, Y=Y, bias=b)
    for name, t in tensors.items():
        if t is not None and (name not in ("U", "V") or grad_basis):
            t.requires_grad_(True)
    return tensors


def dense_f64(x, U, V, sigma, X, Y, bias, scaling=1.0):
    """Explicit float64 formula: W = U (diag(sigma) + s X Y) V^T, y = x W^T + b."""
    W = U @ (torch.diag(sigma) + scaling * X @ Y) @ V.t()
    y = x @ W.t()
    return y if bias is None else y + bias


def ground_truth(tensors, grad_out, scaling=1.0):
    """Forward and every gradient of the dense float64 formula."""
    t64 = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad))
           for k, v in tensors.items()}
    y = dense_f64(*(t64[n] for n in GRAD_NAMES), scaling=scaling)
    wanted = [n for n in GRAD_NAMES if t64[n] is not None and t64[n].requires_grad]
    grads = torch.autograd.grad(y, [t64[n] for n in wanted], grad_out.double()) if wanted else []
    return y.detach(), dict(zip(wanted, grads))


def magnitude_reference(fn64, inputs: dict, grad_out):
    """The same float64 computation on |inputs| and |grad_out|: the scale of the terms
    that are summed. Rounding error in any evaluation order of these multilinear maps is
    bounded by (a few ulps) x this (the standard |fl(AB) - AB| <= g_n |A||B| bound), so
    it measures error where the exact result cancels to nearly nothing (a 1-element
    dsigma summed over a few rows, say) and relative-to-|truth| would be meaningless.
    Returns (forward magnitude, {name: gradient magnitude}) for inputs requiring grad."""
    absd = {k: (None if v is None else v.detach().abs().requires_grad_(v.requires_grad))
            for k, v in inputs.items()}
    y = fn64(absd)
    wanted = [k for k, v in absd.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [absd[k] for k in wanted], grad_out.abs()) if wanted else []
    return y.detach(), dict(zip(wanted, grads))


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor, scale_ref: torch.Tensor | None = None) -> float:
    """max |actual - expected| / max |scale_ref| (default: expected)."""
    ref = expected if scale_ref is None else scale_ref
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (actual.detach().double().cpu() - expected.cpu()).abs().max().item() if expected.numel() else 0.0
    return err / max(scale, 1e-30) if scale > 0 else err


def assert_matches_ground_truth(fn, tensors, dtype, *, scaling=1.0, tol=None, seed=1, upstream="random",
                                scale="truth"):
    """Run ``fn(**tensors, scaling=scaling)`` forward and backward with a random upstream
    gradient (``upstream="sum"``: the gradient of ``y.sum()``, a stride-0 tensor of ones)
    and compare output and every gradient with float64 ground truth: max error relative
    to max |truth| (``scale="truth"``) or to the :func:`magnitude_reference`
    (``scale="magnitude"``, for random problems where results may cancel)."""
    tol = TOLERANCES[dtype] if tol is None else tol
    y = fn(**tensors, scaling=scaling)
    assert y.dtype == tensors["x"].dtype, f"output dtype {y.dtype} != x dtype {tensors['x'].dtype}"
    D = tensors["U"].shape[0]
    assert y.shape == (*tensors["x"].shape[:-1], D)
    g = torch.Generator().manual_seed(seed)
    if upstream == "sum":
        grad_out = torch.ones(y.shape, dtype=torch.float64)
    else:
        # rounded to y's dtype first: the ground truth sees the upstream gradient the
        # backend sees (as it sees the rounded inputs)
        grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).double()
    y_ref, grads_ref = ground_truth(tensors, grad_out, scaling)
    y_mag, grads_mag = (y_ref, grads_ref)
    if scale == "magnitude":
        t64 = {k: (None if v is None else v.detach().double().requires_grad_(v.requires_grad))
               for k, v in tensors.items()}
        y_mag, grads_mag = magnitude_reference(
            lambda t: dense_f64(*(t[n] for n in GRAD_NAMES), scaling=abs(scaling)), t64, grad_out)
    err = max_rel_err(y, y_ref, y_mag)
    assert err <= tol, f"forward: max relative error {err:.3e} > {tol:.1e}"
    wanted = list(grads_ref)
    if not wanted:
        return
    if upstream == "sum":
        grads = torch.autograd.grad(y.sum(), [tensors[n] for n in wanted], allow_unused=True)
    else:
        grads = torch.autograd.grad(y, [tensors[n] for n in wanted], grad_out.to(y.dtype).to(y.device),
                                    allow_unused=True)
    for name, gr in zip(wanted, grads):
        if gr is None and tensors[name].numel() == 0:
            continue  # an empty X / Y (lora_rank 0) gets no gradient, and needs none
        assert gr is not None, f"d{name} is None but {name} requires grad"
        assert gr.shape == tensors[name].shape, f"d{name} shape {tuple(gr.shape)}"
        assert gr.dtype == tensors[name].dtype, f"d{name} dtype {gr.dtype}"
        err = max_rel_err(gr, grads_ref[name], grads_mag[name])
        assert err <= tol, f"d{name}: max relative error {err:.3e} > {tol:.1e}"


# --- SALT layers (SALTLinear / SALTConv2d, every variant) against float64 ---------------

def dense_layer_f64(layer, p, x):
    """The layer's output from its float64 tensors ``p`` (name -> tensor), written out
    independently of the package: sigma' = sigma or relu(alpha * sigma0 + beta),
    W = residual + U (diag(sigma') + s X Y) V^T (a quantized residual dequantized by
    bitsandbytes), then F.linear / F.conv2d with W."""
    import torch.nn.functional as F

    if layer.sigma_mode == "direct":
        sigma = p["sigma"]
    else:
        sigma = torch.relu(p["alpha"] * p["sigma0"] + p["beta"])
    quantized = getattr(layer, "quantized_residual", None)
    if getattr(layer, "quantized_base", False):  # the quantized weight is the whole base: C - Sigma0
        sigma = sigma - p["sigma0"]
    W = p["U"] @ (torch.diag(sigma) + layer.scaling * p["X"] @ p["Y"]) @ p["V"].t()
    if p.get("residual_weight") is not None:
        W = W + p["residual_weight"].reshape(W.shape)
    if quantized is not None:  # a quantized residual: its dequantized values (exact in float32)
        W = W + quantized.dequantize(torch.float32).double().cpu()
    if hasattr(layer, "kernel_size"):
        W = W.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)
        return F.conv2d(x, W, p.get("bias"), layer.stride, layer.padding, layer.dilation)
    return F.linear(x, W, p.get("bias"))


def assert_layer_matches_ground_truth(layer, x, dtype, *, tol=None, seed=1, out_dtype=None, scale="truth",
                                      forward=None):
    """Forward and the gradients of x and every trainable parameter of ``layer`` against
    :func:`dense_layer_f64` on float64 copies of the same tensors (``scale`` as in
    :func:`assert_matches_ground_truth`). ``forward(x)`` replaces ``layer(x)`` if given
    (e.g. to run only the forward under autocast)."""
    tol = TOLERANCES[dtype] if tol is None else tol
    x = x.detach().requires_grad_(True)
    y = layer(x) if forward is None else forward(x)
    assert y.dtype == (out_dtype or x.dtype), f"output dtype {y.dtype}"
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).double()
    tensors = dict(layer.named_parameters())
    tensors.update((n, b) for n, b in layer.named_buffers() if b is not None)
    p = {n: t.detach().double().cpu().requires_grad_(t.requires_grad) for n, t in tensors.items()}
    x64 = x.detach().double().cpu().requires_grad_(True)
    y_ref = dense_layer_f64(layer, p, x64)
    assert y.shape == y_ref.shape, f"output shape {tuple(y.shape)} != {tuple(y_ref.shape)}"
    names = ["x"] + [n for n, t in layer.named_parameters() if t.requires_grad and t.numel() > 0]
    ref_leaves = [x64] + [p[n] for n in names[1:]]
    leaves = [x] + [tensors[n] for n in names[1:]]
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, grad_out)
    y_mag, grads_mag = y_ref, dict(zip(names, grads_ref))
    if scale == "magnitude":
        inputs = dict(p, x=x64)

        def fn64(t):
            return dense_layer_f64(layer, {k: v for k, v in t.items() if k != "x"}, t["x"])

        y_mag, grads_mag = magnitude_reference(fn64, inputs, grad_out)
    err = max_rel_err(y, y_ref, y_mag)
    assert err <= tol, f"forward: max relative error {err:.3e} > {tol:.1e}"
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype).to(y.device))
    for name, gr, gr_ref, leaf in zip(names, grads, grads_ref, leaves):
        assert gr.shape == leaf.shape and gr.dtype == leaf.dtype, f"d{name}: {gr.shape} {gr.dtype}"
        err = max_rel_err(gr, gr_ref, grads_mag[name])
        assert err <= tol, f"d{name}: max relative error {err:.3e} > {tol:.1e}"


@torch.no_grad()
def perturb(layer, seed=0):
    """Move a layer away from init as training would: sigma'/X Y/residual all non-trivial,
    and one singular value driven below zero so the scale_shift ReLU is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t, scale):
        return (torch.randn(t.shape, generator=g) * scale).to(t.dtype).to(t.device)

    layer.Y.copy_(rnd(layer.Y, 0.5))
    if layer.sigma_mode == "direct":
        layer.sigma.add_(rnd(layer.sigma, 0.1))
    else:
        layer.alpha.add_(rnd(layer.alpha, 0.2))
        layer.beta.copy_(rnd(layer.beta, 0.1))
        layer.beta[0] = -2 * layer.sigma0[0] * layer.alpha[0]
    if layer.residual_weight is not None:
        layer.residual_weight.copy_(rnd(layer.residual_weight, 0.05))
    return layer
