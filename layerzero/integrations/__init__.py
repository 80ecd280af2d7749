"""Framework integrations, the top of the patching stack: what is specific to transformers or
diffusers (attention, RoPE, MoE experts, pipelines, their own registries of attention functions).

Importing this package (which `import layerzero` does) imports each integration, and each
registers itself on import: with `lz.patch` (`layerzero.patching.frameworks.register_integration`)
and, through post-import hooks, with its framework once the user imports it. An integration
imports its framework only inside functions, so importing it is cheap and works without the
framework installed. Only `layerzero/__init__.py` imports this package; nothing else in
`layerzero` imports an integration.

`lz.patch` asks the integrations in the order registered here (the first owning a model patches it).
"""
from . import transformers
from . import diffusers

__all__ = ["transformers", "diffusers"]
