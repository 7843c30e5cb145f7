"""SALT backends: the lowest layer. Each backend is one module (or package) that
declares, with module attributes, what it implements; :mod:`salt_kernels.ops.dispatch`
reads the declarations and is the only place that chooses between backends.

Every backend declares:

* ``availability(device, backend) -> str | None``: None when it can run on ``device``,
  else the reason and how to get it.
* ``salt_linear_2d(x, U, V, sigma, X, Y, bias, scaling) -> y``: the plain forward on a
  validated 2-D ``x (M, K)``, differentiable in every tensor argument.
* ``MAX_RANK`` (optional): the largest rank it runs (no limit when absent).

A backend that serves mixed-adapter batches (``salt_linear(..., adapter_index=...)``)
also declares:

* ``multi_linear_2d(x, U, V, sigma, X, Y, bias, index, base_sigma, base_bias, scaling)``:
  the mixed forward on a validated 2-D ``x`` and flat ``index`` (contract in
  :mod:`salt_kernels.ops.multi_adapter`).
* ``MULTI_BACKWARD`` (default False): ``multi_linear_2d`` is differentiable in ``x``, the
  bank and the biases (a frozen ``U``, ``V``).
* ``MULTI_BASIS_BACKWARD`` (default False): ... and in ``U``, ``V`` too.
* ``MULTI_MAX_RANK`` (optional): ``{dtype: largest rank}``; a dtype not listed is not
  served by ``multi_linear_2d``. Absent: every dtype, up to ``MAX_RANK``.

What a backend does not implement for a call goes to the next backend of the device's
``auto`` order that does, ending at ``reference``, which implements everything.

Shared by the kernel backends: :mod:`.core` (the r x r core ``C``, autocast helpers)
and :mod:`.autograd` (autograd for a forward/backward op pair).
"""
