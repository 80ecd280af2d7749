"""The machinery behind `lz.patch`, bottom to top: a module here imports only modules listed
before it, and never `layerzero.patch` or `layerzero.integrations` (tests/test_import_layers.py).

    hooks.py        post-import hooks (`when_imported`)
    record.py       `Item`, `Report`, the per-model record of what was changed and how to undo it
    swap.py         swapping a module's forward or an attribute, with undo; `observe` (for explain)
    rebind.py       copies of functions reading other module-level names (`with_globals`)
    probes.py       probe inputs, running a module's own forward, `agree`
    norms.py        recogniser: norms -> lz.rms_norm / lz.layer_norm
    mlps.py         recogniser: gated MLPs -> lz.swiglu / lz.geglu
    residual.py     recogniser: pre-norm decoder blocks -> residual adds fused into their kernels
    frameworks.py   the registry of framework integrations

Above them, `layerzero.patch` holds the public verbs (`lz.patch`, `lz.unpatch`, `lz.auto_patch`,
`lz.explain(model)`); on top, `layerzero.integrations.*` (what is framework-specific: attention,
RoPE, MoE experts, pipelines) import from both and register themselves in `frameworks`.

This package imports nothing when imported; import its modules.
"""
