"""Data pipeline: dataset spec, synthetic campaign-log generator, and a per-rank streaming Parquet reader.

Import the submodules directly (data_pipeline.spec / .batch / .synthetic / .reader); the package import is kept
light so that the spec can be read without pulling in torch.
"""
