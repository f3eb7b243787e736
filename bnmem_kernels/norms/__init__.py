"""Per-sample gradient norms: per-layer rules, the one-pass hook engine (column / detached / eval),
the exact engine (exact.py), the GradNormProbe, and the shared pieces (_state, _checks).

Nothing is imported here eagerly, so `bnmem_kernels.reference` can import `norms._checks` and
`norms._state` without a cycle. Public entry points live in `bnmem_kernels` itself.
"""
