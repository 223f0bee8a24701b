"""Checkpoint interoperability: HuggingFace DeepSeek-V3 safetensors <-> moejax variables.

    >>> from moejax.interop import hf
    >>> config, variables = hf.load(hf_dir)
    >>> hf.save(config, variables, out_dir)
"""
