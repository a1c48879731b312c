"""The layer spec for Megatron-LM's own trainer::

    pretrain_gpt.py --spec megatron_anchor.megatron_lm_spec anchor_layer_spec \\
        --position-embedding-type none ...

Megatron's `import_module` reads the named object with ``vars(module)[name]``, so it has to
be a real attribute of a module (a module-level ``__getattr__`` is not consulted). It is
built here, when Megatron-LM's model provider first imports this module, from the arguments
Megatron-LM has parsed by then: rotary base, transformer implementation (`te` backend for
``transformer_engine``, `local` otherwise), QK layernorm, Llama-3.1 RoPE scaling and
``--rope-bf16``. Importing it outside a Megatron-LM run is an error.
"""

from megatron.training import get_args

from megatron_anchor.training.megatron_lm import layer_spec_from_args

anchor_layer_spec = layer_spec_from_args(get_args())
