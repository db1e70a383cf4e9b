"""Pure-torch twins of the Triton kernels: same signatures, same output dtypes.

These are the specification of each op; the reference loop runs on them with the
``torch`` backend.
"""
