"""SALT backends. Each module exposes ``availability(device, backend) -> str | None`` (None when
usable, else the reason and how to get it) and ``salt_linear_2d(x, U, V, sigma, X, Y,
bias, scaling) -> y`` on validated 2-D ``x`` (M, K). The choice between them lives in
:mod:`salt_kernels.dispatch` alone."""
