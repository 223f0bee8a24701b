"""Checkpoint interoperability: HuggingFace DeepSeek-V3 safetensors <-> moejax variables.

    >>> from moejax.interop import hf
    >>> config, variables = hf.load(hf_dir)
    >>> hf.save(config, variables, out_dir)

Full sizes: `hf_stream.load_sharded(hf_dir, mesh, dtype)` reads each device's slices into
sharded jax.Arrays without building the model in host memory (the CLI's default import).
"""
