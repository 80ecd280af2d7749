"""LayerZero on every diffusers model class (issue 14): tiny configs, CPU, fp32.

Which classes: every name exported by `diffusers.models` that is a class deriving from
`diffusers.ModelMixin` (ModelMixin itself excluded). Each gets a family from the sub-package
that defines it (transformers, unets, controlnets, autoencoders, adapter, condition_embedders,
latent_upscaler). Wrappers that only hold other models (Multi*ControlNet*, MultiAdapter) and
parts that never run alone (MotionAdapter, ControlNetXSAdapter: their forward is a stub; both
are covered inside UNetMotionModel / UNetControlNetXSModel) are "not applicable".

For each class: a tiny model (`SPECS[name]`: hand-written config and forward inputs, most taken from
the shapes diffusers' own model tests use; a class without one gets `generic_spec`, a shrink of its
`__init__` defaults with inputs guessed from `forward`'s parameter names), built in fp32 after
`torch.manual_seed(0)`, in eval mode, with uninitialised or all-zero weights given seeded values (see
`reinit`); the unpatched output is the reference (two unpatched forwards must agree bit for bit),
then two routes:

- "patch":   deepcopy -> `lz.patch(copy)` -> forward == reference (atol = rtol = 1e-4) ->
             `lz.unpatch(copy)` -> forward bit-identical (`torch.equal`) to the reference.
- "backend": `model.set_attention_backend("layerzero")` (diffusers' dispatcher, the registered
             "layerzero" backend) -> forward == reference -> every processor's previous backend and the
             registry's active backend restored (what `reset_attention_backend()` does, except that a
             processor's own default such as "flex" comes back too) -> forward bit-identical to the
             reference.

Every tensor of the output is compared (sample, controlnet residual lists, audio outputs...).
Engagement: the report's patched items per kind (attention / norm / rope / mlp) and the ops that
LayerZero actually ran (`lz.metrics()["calls"]`), per route.

Status per class: ok | changed (an output differs beyond tolerance, or unpatch/reset is not
bit-exact) | raises (where: patch / patched forward / unpatch / backend..., first line) |
not built (harness limit: the tiny model or its inputs could not be made / the unpatched forward
fails; first line) | not applicable.

Usage:
  python scripts/zoo_diffusers.py                       # every class, one worker process
  python scripts/zoo_diffusers.py --only FluxTransformer2DModel UNet2DConditionModel
  python scripts/zoo_diffusers.py --json zoo.json --markdown zoo.md --timeout 120 --jobs 2
  python scripts/zoo_diffusers.py --list                # the classes and their families

Each class runs in a worker process (multiprocessing, spawn): a class that hangs past --timeout
or crashes the interpreter is recorded as raising and the worker is replaced.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import re
import math
import os
import sys
import time
import traceback

TOL = dict(atol=1e-4, rtol=1e-4)
KINDS = ("attention", "norm", "rope", "mlp")

# wrappers and parts that do not run on their own (see the module docstring)
NOT_APPLICABLE = {
    "MultiControlNetModel": "holds ControlNetModel instances (each covered on its own)",
    "MultiControlNetUnionModel": "holds ControlNetUnionModel instances (covered on its own)",
    "FluxMultiControlNetModel": "holds FluxControlNetModel instances (covered on its own)",
    "SD3MultiControlNetModel": "holds SD3ControlNetModel instances (covered on its own)",
    "HunyuanDiT2DMultiControlNetModel": "holds HunyuanDiT2DControlNetModel instances (covered on its own)",
    "QwenImageMultiControlNetModel": "holds QwenImageControlNetModel instances (covered on its own)",
    "MultiAdapter": "holds T2IAdapter instances (covered on its own)",
    "MotionAdapter": "weights for UNetMotionModel; forward is a stub (covered by UNetMotionModel)",
    "ControlNetXSAdapter": "the control half of UNetControlNetXSModel; forward is a stub (covered there)",
}


# ---- inputs --------------------------------------------------------------------------------------

class R:
    """Reproducible random inputs (one CPU generator per class)."""

    def __init__(self, seed: int = 1):
        import torch
        self.torch = torch
        self.g = torch.Generator().manual_seed(seed)

    def n(self, *shape):
        return self.torch.randn(*shape, generator=self.g)

    def i(self, high, *shape):
        return self.torch.randint(0, high, shape, generator=self.g)

    def u(self, *shape):
        return self.torch.rand(*shape, generator=self.g)

    def t(self, *values, dtype=None):
        return self.torch.tensor(values, dtype=dtype)

    def ones(self, *shape, dtype=None):
        return self.torch.ones(*shape, dtype=dtype)

    def zeros(self, *shape, dtype=None):
        return self.torch.zeros(*shape, dtype=dtype)


def flux_ids(h, w, axes=3, t=0):
    """Flux-style position ids: (h*w, axes) with (t, row, col) in the last three columns."""
    import torch
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.zeros(h * w, axes)
    ids[:, -2], ids[:, -1] = rows.reshape(-1).float(), cols.reshape(-1).float()
    if axes >= 3:
        ids[:, -3] = t
    return ids


# ---- the tiny models ---------------------------------------------------------------------------
# SPECS[name] = dict(config=..., inputs=lambda r: {...}) [, build=callable(cls, config) -> model]

UNET_SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)

SPECS: dict[str, dict] = {}


def spec(name, config, inputs, build=None, reinit=()):
    """reinit: parameter-name fragments of weights the class leaves uninitialised (torch.empty,
    filled only by from_pretrained); they get seeded normal(0, 0.02) values."""
    SPECS[name] = {"config": config, "inputs": inputs, "build": build, "reinit": tuple(reinit)}


# transformers ----------------------------------------------------------------------------------

spec("Transformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1, norm_num_groups=4,
          cross_attention_dim=16),
     lambda r: dict(hidden_states=r.n(1, 8, 4, 4), encoder_hidden_states=r.n(1, 5, 16)))

spec("TransformerTemporalModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1, norm_num_groups=4),
     lambda r: dict(hidden_states=r.n(2, 8, 4, 4), num_frames=2))

spec("DiTTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
          patch_size=2, num_embeds_ada_norm=10),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(3), class_labels=r.t(1)))

spec("PixArtTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
          cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, use_additional_conditions=False),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}))

spec("LatteTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
          cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, norm_type="ada_norm_single",
          num_embeds_ada_norm=1000, activation_fn="gelu-approximate", norm_elementwise_affine=False,
          norm_eps=1e-6, video_length=2),
     lambda r: dict(hidden_states=r.n(1, 4, 2, 8, 8), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3)))

spec("SD3Transformer2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
          joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
          pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 16),
                    pooled_projections=r.n(1, 16), timestep=r.t(3)))

spec("FluxTransformer2DModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
          guidance_embeds=True),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16), pooled_projections=r.n(1, 16),
                    timestep=r.t(0.5), img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3), guidance=r.t(3.5)))

spec("FluxControlNetModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 8), controlnet_cond=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16),
                    pooled_projections=r.n(1, 16), timestep=r.t(0.5), img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3)))

spec("SD3ControlNetModel",
     dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
          joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
          pos_embed_max_size=16),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), controlnet_cond=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 16),
                    pooled_projections=r.n(1, 16), timestep=r.t(3)))

spec("BriaTransformer2DModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(0, 4, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16), timestep=r.t(0.5),
                    img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3)))

spec("ChromaTransformer2DModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
          approximator_hidden_dim=16, approximator_layers=1),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16), timestep=r.t(0.5),
                    img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3)))

spec("LongCatImageTransformer2DModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16), timestep=r.t(0.5),
                    img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3)))

spec("OvisImageTransformer2DModel",
     dict(patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 4, 16), timestep=r.t(0.5),
                    img_ids=flux_ids(4, 4), txt_ids=r.zeros(4, 3)))

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def wan_inputs(r, c=4):
    return dict(hidden_states=r.n(1, c, 2, 8, 8), encoder_hidden_states=r.n(1, 6, 16), timestep=r.t(3))


spec("WanTransformer3DModel", WAN, wan_inputs)
spec("SkyReelsV2Transformer3DModel", WAN, wan_inputs)
spec("ChronoEditTransformer3DModel", WAN, wan_inputs)
spec("WanVACETransformer3DModel", dict(WAN, vace_layers=[0], vace_in_channels=8),
     lambda r: dict(wan_inputs(r), control_hidden_states=r.n(1, 8, 2, 8, 8), control_hidden_states_scale=r.t(1.0)))

spec("CogVideoXTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
          text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
          temporal_compression_ratio=4, max_text_seq_length=8),
     lambda r: dict(hidden_states=r.n(1, 3, 4, 8, 8), encoder_hidden_states=r.n(1, 8, 16), timestep=r.t(3)))

spec("MochiTransformer3DModel",
     dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
          in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=16),
     lambda r: dict(hidden_states=r.n(1, 4, 2, 8, 8), encoder_hidden_states=r.n(1, 16, 16), timestep=r.t(3),
                    encoder_attention_mask=r.ones(1, 16)))

spec("LTXVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
          cross_attention_dim=16, num_layers=1, caption_channels=16),
     lambda r: dict(hidden_states=r.n(1, 2 * 4 * 4, 4), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3),
                    encoder_attention_mask=r.ones(1, 5), num_frames=2, height=4, width=4))

spec("AllegroTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
          cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=8, caption_channels=16),
     lambda r: dict(hidden_states=r.n(1, 4, 2, 8, 8), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3)))

spec("AuraFlowTransformer2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
          out_channels=4, pos_embed_max_size=64),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3)))

spec("Lumina2Transformer2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
          num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
          cap_feat_dim=16),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 5, 16),
                    encoder_attention_mask=r.ones(1, 5, dtype=r.torch.bool)))

spec("PriorTransformer",
     dict(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8, num_embeddings=7,
          additional_embeddings=4),
     lambda r: dict(hidden_states=r.n(1, 8), timestep=2, proj_embedding=r.n(1, 8), encoder_hidden_states=r.n(1, 7, 8)))

spec("T5FilmDecoder",
     dict(input_dims=4, targets_length=8, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, dropout_rate=0.0),
     lambda r: dict(encodings_and_masks=[(r.n(1, 6, 16), r.ones(1, 6, dtype=r.torch.bool))],
                    decoder_input_tokens=r.n(1, 8, 4), decoder_noise_time=r.u(1)))


def flux2_ids(h, w, s):
    """Flux.2 ids: image (1, h*w, 4) = (t, h, w, l) and text (1, s, 4) = (0, 0, 0, l)."""
    import torch
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(s))
    return img[None], txt[None]


spec("Flux2Transformer2DModel",
     dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 4), encoder_hidden_states=r.n(1, 8, 32), img_ids=flux2_ids(4, 4, 8)[0],
                    txt_ids=flux2_ids(4, 4, 8)[1], timestep=r.t(1.0), guidance=r.t(1.0)))

spec("Flux3Transformer2DModel",
     dict(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
          num_attention_heads=2, joint_attention_dim=32, timestep_channels=256, axes_dims_rope=(4, 4, 4, 4)),
     lambda r: dict(hidden_states=r.n(1, 16, 4), encoder_hidden_states=r.n(1, 8, 32), img_ids=flux2_ids(4, 4, 8)[0][0],
                    txt_ids=flux2_ids(4, 4, 8)[1][0], timestep=r.t(1.0)))

QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4))


def qwen_inputs(r):
    mask = r.ones(1, 8, dtype=r.torch.long)
    mask[0, 6:] = 0
    return dict(hidden_states=r.n(1, 16, 16), encoder_hidden_states=r.n(1, 8, 16), encoder_hidden_states_mask=mask,
                timestep=r.t(1.0), img_shapes=[(1, 4, 4)])


spec("QwenImageTransformer2DModel", dict(QWEN, guidance_embeds=False), qwen_inputs)
spec("QwenImageControlNetModel", QWEN,
     lambda r: dict(qwen_inputs(r), controlnet_cond=r.n(1, 16, 16), conditioning_scale=1.0))

spec("HunyuanVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
          num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 9, 16),
                    encoder_attention_mask=r.t([1] * 7 + [0] * 2), pooled_projections=r.n(1, 8),
                    guidance=r.t(3.0)))

spec("HunyuanVideoFramepackTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
          num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), image_condition_type=None, has_image_proj=True,
          image_proj_dim=16, has_clean_x_embedder=True),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 9, 16),
                    encoder_attention_mask=r.ones(1, 9), pooled_projections=r.n(1, 8), image_embeds=r.n(1, 4, 16),
                    indices_latents=r.t(0), guidance=r.t(3.0), latents_clean=r.n(1, 4, 1, 8, 8),
                    indices_latents_clean=r.t(1), latents_history_2x=r.n(1, 4, 2, 8, 8),
                    indices_latents_history_2x=r.t(2, 3), latents_history_4x=r.n(1, 4, 4, 8, 8),
                    indices_latents_history_4x=r.t(4, 5, 6, 7)))

spec("HunyuanImageTransformer2DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
          num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(3.0), encoder_hidden_states=r.n(1, 5, 16),
                    encoder_attention_mask=r.t([1, 1, 1, 1, 0])))

spec("MotifVideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
          patch_size=1, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(2, 2, 4)),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 5, 16),
                    encoder_attention_mask=r.t([1, 1, 1, 1, 0])))

COGVIEW = dict(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
               text_embed_dim=8, time_embed_dim=8, condition_dim=2)


def cogview_inputs(r):
    return dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 8), timestep=r.t(3),
                original_size=r.t([8.0, 8.0]), target_size=r.t([8.0, 8.0]), crop_coords=r.t([0.0, 0.0]))


spec("CogView3PlusTransformer2DModel", dict(COGVIEW, pos_embed_max_size=8, sample_size=8), cogview_inputs)
spec("CogView4Transformer2DModel", dict(COGVIEW, rope_axes_dim=(8, 8)), cogview_inputs)
spec("GlmImageTransformer2DModel", dict(COGVIEW, prior_vq_quantizer_codebook_size=16),
     lambda r: dict({k: v for k, v in cogview_inputs(r).items() if k != "original_size"},
                    prior_token_id=r.i(16, 1, 16), prior_token_drop=r.t([False] * 12 + [True] * 4).view(1, 16)))

spec("ConsisIDTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
          text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
          temporal_compression_ratio=4, max_text_seq_length=8, is_train_face=False),
     lambda r: dict(hidden_states=r.n(1, 3, 4, 8, 8), encoder_hidden_states=r.n(1, 8, 16), timestep=r.t(3)))

spec("EasyAnimateTransformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
          sample_height=8, num_layers=1, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16, text_embed_dim_t5=16),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 5, 16),
                    encoder_hidden_states_t5=r.n(1, 5, 16)))

SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8)


def sana_inputs(r):
    return dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3),
                encoder_attention_mask=r.t([1, 1, 1, 1, 0]))


spec("SanaTransformer2DModel", SANA, sana_inputs)
spec("SanaControlNetModel", SANA, lambda r: dict(sana_inputs(r), controlnet_cond=r.n(1, 4, 8, 8)))
spec("SanaVideoTransformer3DModel", dict(SANA, patch_size=(1, 2, 2), rope_max_seq_len=32),
     lambda r: dict(sana_inputs(r), hidden_states=r.n(1, 4, 2, 8, 8)))


def stable_audio_inputs(r):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    return dict(hidden_states=r.n(1, 4, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 5, 16),
                global_hidden_states=r.n(1, 1, 16),
                rotary_embedding=get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False))


spec("StableAudioDiTModel",
     dict(sample_size=8, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
          num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
          global_states_input_dim=16, cross_attention_input_dim=16),
     stable_audio_inputs)

spec("StableAudio3DiTModel",
     dict(io_channels=4, patch_size=1, embed_dim=32, depth=1, num_heads=2, cond_token_dim=16, global_cond_dim=16,
          local_add_cond_dim=5, timestep_features_dim=16, num_memory_tokens=2),
     lambda r: dict(hidden_states=r.n(1, 4, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 5, 16),
                    global_hidden_states=r.n(1, 16)))


def hunyuan_dit_inputs(r):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    return dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(3.0), encoder_hidden_states=r.n(1, 5, 16),
                text_embedding_mask=r.t([1, 1, 1, 1, 0]), encoder_hidden_states_t5=r.n(1, 5, 16),
                text_embedding_mask_t5=r.t([1, 1, 1, 0, 0]), image_meta_size=r.t([8.0, 8, 8, 8, 0, 0]),
                style=r.t(0), image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt"))


HUNYUAN_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
                   hidden_size=16, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
                   text_len=5, text_len_t5=5)
spec("HunyuanDiT2DModel", dict(HUNYUAN_DIT, num_layers=2), hunyuan_dit_inputs)
spec("HunyuanDiT2DControlNetModel", dict(HUNYUAN_DIT, transformer_num_layers=4),
     lambda r: dict(hunyuan_dit_inputs(r), controlnet_cond=r.n(1, 4, 8, 8)))

spec("Kandinsky5Transformer3DModel",
     dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
          model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6)),
     lambda r: dict(hidden_states=r.n(1, 1, 8, 8, 4), encoder_hidden_states=r.n(1, 5, 16), timestep=r.t(3.0),
                    pooled_projections=r.n(1, 8),
                    visual_rope_pos=[r.torch.arange(1), r.torch.arange(4), r.torch.arange(4)],
                    text_rope_pos=r.torch.arange(5)))


WAN_BASE = {k: v for k, v in WAN.items() if k not in ("qk_norm", "rope_max_seq_len")}
spec("AnyFlowTransformer3DModel", dict(WAN_BASE, rope_max_seq_len=32, deltatime_type="r"),
     lambda r: dict(wan_inputs(r), hidden_states=r.n(1, 2, 4, 8, 8), timestep=r.t(3.0, 3.0).view(1, 2),
                    r_timestep=r.t(1.0, 1.0).view(1, 2)))  # (B, F, C, H, W); per-frame timesteps

spec("HeliosTransformer3DModel", dict(WAN_BASE, rope_dim=(4, 4, 4)), wan_inputs)

spec("ZImageTransformer2DModel",
     dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
          n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64]),  # = ZIMAGE below
     lambda r: dict(x=[r.n(4, 1, 8, 8)], t=r.t(0.5), cap_feats=[r.n(5, 16)]))

spec("ErnieImageTransformer2DModel",
     dict(hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=64, in_channels=4, out_channels=4,
          patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6)),
     lambda r: dict(hidden_states=r.n(1, 4, 4, 4), timestep=r.t(0.5), text_bth=r.n(1, 5, 16), text_lens=r.t(4)))

spec("NucleusMoEImageTransformer2DModel",
     dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
          joint_attention_dim=16, axes_dims_rope=(8, 4, 4), num_experts=4, moe_intermediate_dim=16,
          dense_moe_strategy=None, capacity_factors=1.0),
     lambda r: dict({k: v for k, v in qwen_inputs(r).items()}), reinit=("experts.",))

spec("PRXTransformer2DModel",
     dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, num_heads=2, depth=1, axes_dim=[8, 8]),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 5, 16),
                    attention_mask=r.t([1, 1, 1, 1, 0]).bool()))


def lumina_next_inputs(r):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    return dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 5, 16),
                encoder_mask=r.t([1, 1, 1, 1, 0]), image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 16, 16),
                cross_attention_kwargs={})


spec("LuminaNextDiT2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_attention_heads=2,
          num_kv_heads=1, multiple_of=16, cross_attention_dim=16),
     lumina_next_inputs, reinit=("pad_token",))   # torch.empty, filled by from_pretrained

spec("JoyImageEditTransformer3DModel",
     dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
          rope_dim_list=[4, 6, 6]),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 5, 16)))

spec("LongCatAudioDiTTransformer",
     dict(dit_dim=32, dit_depth=1, dit_heads=2, dit_text_dim=16, latent_dim=4),
     lambda r: dict(hidden_states=r.n(1, 8, 4), encoder_hidden_states=r.n(1, 5, 16),
                    encoder_attention_mask=r.t([1, 1, 1, 1, 0]).bool(), timestep=r.t(0.5)))

spec("MiniMaxMusic3RVQDepthDecoder",
     dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64, audio_vocab_size=16,
          num_codebooks=2, max_position_embeddings=4),
     lambda r: dict(inputs_embeds=r.n(1, 3, 32)))

spec("MiniMaxMusic3Transformer1DModel",
     dict(in_channels=4, condition_dim=16, num_layers=1, num_attention_heads=2, attention_head_dim=8, ff_inner_dim=32,
          rotary_dim=4, fourier_embedding_dim=16),
     lambda r: dict(hidden_states=r.n(1, 4, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 8, 16)))

spec("HiDreamImageTransformer2DModel",
     dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
          num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
          num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=(0, 1),
          force_inference_output=True),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), encoder_hidden_states_t5=r.n(1, 6, 8),
                    encoder_hidden_states_llama3=r.n(2, 1, 6, 4), pooled_embeds=r.n(1, 8), timesteps=r.t(3)))

spec("OmniGenTransformer2DModel",
     dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, num_layers=1,
          pad_token_id=0, vocab_size=50, in_channels=4, time_step_dim=4,
          rope_scaling={"long_factor": [1, 2, 3, 4], "short_factor": [1, 2, 3, 4]}),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.u(1), input_ids=r.i(10, 1, 20),
                    input_img_latents=[r.n(1, 4, 8, 8)], input_image_sizes={0: [[2, 18]]},
                    attention_mask=r.ones(1, 20 + 1 + 16, 20 + 1 + 16),
                    position_ids=r.torch.arange(20 + 1 + 16)[None]))

COSMOS = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1, mlp_ratio=2,
              text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2),
              rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")
# concat_padding_mask=True resizes the mask with torchvision (not a dependency of diffusers)
spec("CosmosTransformer3DModel", COSMOS,
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 6, 16),
                    attention_mask=r.ones(1, 6), fps=30, padding_mask=r.zeros(1, 1, 8, 8)))

spec("BriaFiboTransformer2DModel",
     dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
          joint_attention_dim=16, text_encoder_dim=8, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
     lambda r: dict(hidden_states=r.n(1, 16, 8), encoder_hidden_states=r.n(1, 6, 16), img_ids=flux_ids(4, 4),
                    txt_ids=r.zeros(6, 3), timestep=r.t(1.0), text_encoder_layers=[r.n(1, 6, 8), r.n(1, 6, 8)]))

spec("HunyuanVideo15Transformer3DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
          num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
          image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
     lambda r: dict(hidden_states=r.n(1, 4, 1, 8, 8), timestep=r.t(1.0), encoder_hidden_states=r.n(1, 6, 16),
                    encoder_hidden_states_2=r.n(1, 4, 8), encoder_attention_mask=r.t([1, 1, 1, 1, 1, 0]),
                    encoder_attention_mask_2=r.ones(1, 4), image_embeds=r.zeros(1, 3, 12)))


def qwen21_inputs(r):
    img_mask = r.zeros(1, 4 + 1, dtype=r.torch.bool)   # one vision slot per 2x2 target latents, after the text
    img_mask[:, 4:] = True
    return dict(hidden_states=r.n(1, 4, 4), encoder_hidden_states=r.n(1, 4, 8),
                encoder_hidden_states_mask=r.ones(1, 4, dtype=r.torch.long), timestep=r.t(1.0),
                img_shapes=[[(1, 2, 2)]], img_mask=img_mask)


spec("QwenImage21Transformer2DModel",
     dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
          context_in_dim=8, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
     qwen21_inputs)

def ideogram4_inputs(r):
    from diffusers.models.transformers import transformer_ideogram4 as m
    text, img, c, d = 4, 4, 16, 24
    hidden = r.zeros(1, text + img, c)
    hidden[:, text:] = r.n(1, img, c)
    enc = r.zeros(1, text + img, d)
    enc[:, :text] = r.n(1, text, d)
    pos = r.zeros(1, text + img, 3, dtype=r.torch.long)
    pos[:, :text] = r.torch.arange(text)[:, None]
    off = m.IMAGE_POSITION_OFFSET
    pos[:, text:, 0] = off
    pos[:, text:, 1] = r.torch.tensor([0, 0, 1, 1]) + off
    pos[:, text:, 2] = r.torch.tensor([0, 1, 0, 1]) + off
    ind = r.zeros(1, text + img, dtype=r.torch.long)
    ind[:, :text], ind[:, text:] = m.LLM_TOKEN_INDICATOR, m.OUTPUT_IMAGE_INDICATOR
    return dict(hidden_states=hidden, encoder_hidden_states=enc, timestep=r.t(0.5), position_ids=pos,
                segment_ids=r.ones(1, text + img, dtype=r.torch.long), indicator=ind)


spec("Ideogram4Transformer2DModel",
     dict(in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4, intermediate_size=32, adaln_dim=16,
          llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
     ideogram4_inputs)


def krea2_inputs(r):
    text, h, w = 4, 2, 2
    pos = r.zeros(text + h * w, 3)
    pos[text:, 1] = r.torch.arange(h).repeat_interleave(w).float()
    pos[text:, 2] = r.torch.arange(w).repeat(h).float()
    mask = r.ones(1, text, dtype=r.torch.bool)
    mask[:, -1] = False
    return dict(hidden_states=r.n(1, h * w, 16), encoder_hidden_states=r.n(1, text, 3, 16), timestep=r.t(0.5),
                position_ids=pos, encoder_attention_mask=mask)


spec("Krea2Transformer2DModel",
     dict(in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
          text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1,
          num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0),
     krea2_inputs)

spec("Kandinsky6Transformer3DModel",
     dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
          model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 4, 4), visual_cond=True,
          in_audio_dim=4, out_audio_dim=4),
     lambda r: dict(hidden_states=r.n(1, 2, 4, 4, 2 * 4 + 1), encoder_hidden_states=r.n(1, 6, 8),
                    pooled_projections=r.n(1, 8), timestep=r.t(3.0)))

spec("Kandinsky6SRTransformer3DModel",
     dict(in_visual_dim=4, out_visual_dim=8, time_dim=16, patch_size=(1, 2, 2), model_dim=24, ff_dim=32,
          num_visual_blocks=1, axes_dims=(4, 4, 4)),
     lambda r: dict(hidden_states=r.n(1, 2, 16, 16, 2 * 4 + 1), timestep=r.t(3.0)))

spec("LTX2VideoTransformer3DModel",
     dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
          cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
          audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, qk_norm="rms_norm_across_heads",
          caption_channels=16, rope_double_precision=False),
     lambda r: dict(hidden_states=r.n(1, 2 * 4 * 4, 4), audio_hidden_states=r.n(1, 9, 4),
                    encoder_hidden_states=r.n(1, 8, 16), audio_encoder_hidden_states=r.n(1, 8, 16),
                    timestep=r.t(500.0), encoder_attention_mask=r.t([True] * 7 + [False]), num_frames=2,
                    height=4, width=4, audio_num_frames=9, fps=25.0))

def minimax_h3_inputs(r):
    torch = r.torch
    nt, na, nv = 4, 6, 8
    n = nt + na + nv
    text, audio, video = torch.arange(nt), torch.arange(nt, nt + na), torch.arange(nt + na, n)
    tags = torch.empty(n, dtype=torch.long)
    tags[text], tags[audio], tags[video] = 1, 2, 0          # 0 video, 1 text, 2 audio
    t_idx = torch.zeros(n, dtype=torch.long)
    t_idx[audio] = 1
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n).float()
    pos[video, 1] = (torch.arange(nv) % 4).float()
    pos[video, 2] = (torch.arange(nv) % 2).float()
    return dict(hidden_states=r.n(1, nv, 16), audio_hidden_states=r.n(1, na, 6), encoder_hidden_states=r.n(1, nt, 8),
                timestep=r.t(0.7, 0.3), timestep_indices=t_idx, token_tags=tags, position_ids=pos,
                video_indices=video, audio_indices=audio, text_indices=text)


spec("MiniMaxH3Transformer3DModel",
     dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1, num_refiner_layers=1, ffn_dim=32,
          in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
          time_embed_dim=16, rope_freq_dim=2),
     minimax_h3_inputs)

def sana_wm_inputs(r, f=4, h=8, w=8):
    torch = r.torch
    c2w = torch.eye(4).repeat(1, f, 1, 1)
    c2w[..., 2, 3] = torch.arange(f, dtype=torch.float32) * 0.1
    intr = torch.tensor([float(w), float(h), w / 2, h / 2]).expand(1, f, 4)
    return dict(hidden_states=r.n(1, 4, f, h, w), timestep=r.t(500.0, 400.0, 300.0, 200.0).view(1, 1, f),
                encoder_hidden_states=r.n(1, 1, 16, 8), encoder_attention_mask=r.ones(1, 16, dtype=torch.long),
                camera_conditions=torch.cat([c2w.flatten(start_dim=-2), intr], dim=-1),
                chunk_plucker=r.n(1, 8, f, h, w))


spec("SanaWMTransformer3DModel",
     dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1), softmax_every_n=2,
          linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=8, mlp_ratio=2.0,
          chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2),
     sana_wm_inputs, reinit=("short_conv", "conv_k", "conv_q", "conv_v"))

spec("AceStepTransformer1DModel",
     dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
          sliding_window=4),    # 2 layers: one sliding-window, one full-attention (layer_types default)
     lambda r: dict(hidden_states=r.n(1, 16, 8), timestep=r.t(0.5), timestep_r=r.t(0.3),
                    encoder_hidden_states=r.n(1, 10, 32), context_latents=r.n(1, 16, 16)))

spec("AnyFlowFARTransformer3DModel",
     dict(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
          attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=1,
          cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r"),
     lambda r: dict(hidden_states=r.n(1, 4, 4, 16, 16), timestep=r.torch.full((1, 4), 500.0),
                    r_timestep=r.torch.full((1, 4), 250.0), encoder_hidden_states=r.n(1, 12, 16),
                    chunk_partition=[2, 2]))   # (B, F, C, H, W): 2 compressed + 2 full frames

spec("BriaFibo2Transformer2DModel",
     dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
          injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
          gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16)),
     lambda r: dict(hidden_states=r.n(1, 4, 8, 8), timestep=r.t(0.5), encoder_hidden_states=r.n(1, 2, 6, 24),
                    context_latents=[r.n(1, 4, 6, 10)]))   # bundles: perceiver + one per injection block

spec("JoyImageEditPlusTransformer3DModel",
     dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
          rope_dim_list=[4, 6, 6], theta=256),
     lambda r: dict(hidden_states=r.n(1, 2, 16, 1, 2, 2), encoder_hidden_states=r.n(1, 12, 16), timestep=r.t(1.0),
                    shape_list=[[(1, 1, 1), (1, 1, 1)]]))   # (B, images, C, F, H, W): target + one reference

def sana_wm_refiner_inputs(r):
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed
    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(
        dim=2 * 8, patch_size=1, patch_size_t=1, base_num_frames=20, base_height=2048, base_width=2048,
        scale_factors=(8, 32, 32), modality="video", double_precision=False, num_attention_heads=2)
    coords = rope.prepare_video_coords(1, 2, 4, 4, device="cpu", fps=24.0)
    return dict(hidden_states=r.n(1, 2 * 4 * 4, 4), encoder_hidden_states=r.n(1, 8, 16),
                timestep=r.u(1, 2 * 4 * 4) * 1000, video_rotary_emb=rope(coords, device="cpu"),
                encoder_attention_mask=r.t([1.0] * 7 + [0.0]))


spec("SanaWMLTX2RefinerTransformer3DModel",
     dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
          cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
          audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, qk_norm="rms_norm_across_heads",
          caption_channels=16, rope_double_precision=False),
     sana_wm_refiner_inputs)

spec("WanAnimateTransformer3DModel",
     dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
          out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
          qk_norm="rms_norm_across_heads", image_dim=16, rope_max_seq_len=32,
          motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
          motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
          inject_face_latents_blocks=2),
     # 21 latent frames: 1 reference + 20 (the face encoder's 77-frame segment maps onto 20 + 1)
     lambda r: dict(hidden_states=r.n(1, 12, 21, 8, 8), timestep=r.t(3), encoder_hidden_states=r.n(1, 12, 16),
                    encoder_hidden_states_image=r.n(1, 12, 16), pose_hidden_states=r.n(1, 4, 20, 8, 8),
                    face_pixel_values=r.n(1, 3, 77, 16, 16)))

def wan_animate2_inputs(r):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    # the reference pass (kv_cache_mode="extract"): 2 latent frames of 4x4 -> a 2x2x2 patch grid
    return dict(hidden_states=[r.n(16, 2, 4, 4)], timestep=r.t(1.0), encoder_hidden_states=[r.n(8, 32)],
                condition_latents=[r.n(20, 2, 4, 4)], encoder_hidden_states_image=r.n(1, 4, 1280),
                kv_cache=WanAnimate2KVCache(1), kv_cache_mode="extract", seq_len=2 * 4,
                offset_grid_sizes=r.t([2, 2, 2]))


spec("WanAnimate2Transformer3DModel",
     dict(patch_size=(1, 2, 2), text_len=16, in_dim=16 + 20, dim=32, ffn_dim=64, freq_dim=64, text_dim=32, out_dim=16,
          num_heads=2, num_layers=1, cross_attn_norm=True, use_img_emb=True),   # CLIP dim 1280 is hard-coded
     wan_animate2_inputs)

def cosmos3_inputs(r, h=2, w=2):
    n = h * w
    seq = 2 + n
    vis = r.torch.arange(2, seq)
    return dict(input_ids=r.t(1, 2), text_indexes=r.t(0, 1), position_ids=r.zeros(3, seq, dtype=r.torch.long),
                und_len=2, sequence_length=seq, vision_tokens=[r.n(1, 2, 1, h, w)], vision_token_shapes=[(1, h, w)],
                vision_sequence_indexes=vis, vision_mse_loss_indexes=vis, vision_timesteps=r.ones(n),
                vision_noisy_frame_indexes=[r.t(0)])


spec("Cosmos3OmniTransformer",
     dict(head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2, latent_patch_size=1,
          num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1, patch_latent_dim=2,
          qk_norm_for_text=False, rope_axes_dim=[1, 1, 1], rope_theta=1e8, vocab_size=32),
     cosmos3_inputs)

spec("RFD4ProteinaTransformer",
     dict(nlayers=1, token_dim=32, nheads=2, dim_cond=16, pair_repr_dim=8, latent_dim=4, token_type_emb_dim=8,
          cath_emb_dim=8, t_emb_dim=16, seq_sep_dim=8, xt_pair_dist_dim=8, tri_mult_c=8,
          feats_seq=("xt_bb_ca", "xt_local_latents"), feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
          feats_pair_repr=("xt_bb_ca_pair_dists",), feats_pair_cond=("time_emb_bb_ca", "time_emb_local_latents"),
          update_pair_repr_every_n=1),
     lambda r: dict(bb_ca=r.n(1, 6, 3), local_latents=r.n(1, 6, 4), bb_ca_time=r.t(0.5), local_latents_time=r.t(0.5),
                    padding_mask=r.t([True] * 5 + [False]),
                    conditioning={"is_in_context_conditioning": r.zeros(1, 6, dtype=r.torch.bool),
                                  "supports_local_latent": r.ones(1, 6, dtype=r.torch.bool)}))

# unets -----------------------------------------------------------------------------------------

spec("UNet2DConditionModel",
     dict(UNET_SMALL, sample_size=8, in_channels=4, out_channels=4,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          cross_attention_dim=16, attention_head_dim=4),
     lambda r: dict(sample=r.n(2, 4, 8, 8), timestep=3, encoder_hidden_states=r.n(2, 5, 16),
                    encoder_attention_mask=r.t([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])))

spec("UNet2DModel",
     dict(UNET_SMALL, sample_size=8, in_channels=3, out_channels=3, attention_head_dim=4,
          down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
     lambda r: dict(sample=r.n(1, 3, 8, 8), timestep=3))

spec("UNet3DConditionModel",
     dict(UNET_SMALL, sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=4,
          down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
     lambda r: dict(sample=r.n(1, 4, 2, 8, 8), timestep=3, encoder_hidden_states=r.n(1, 5, 16)))

spec("UNet1DModel", dict(sample_size=64, extra_in_channels=64),
     lambda r: dict(sample=r.n(1, 2, 64), timestep=r.t(3.0)))

spec("UNetMotionModel",
     dict(UNET_SMALL, in_channels=4, out_channels=4, cross_attention_dim=16, num_attention_heads=2,
          motion_num_attention_heads=2, motion_max_seq_length=8,
          down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
          up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion")),
     lambda r: dict(sample=r.n(1, 4, 2, 8, 8), timestep=3, encoder_hidden_states=r.n(2, 5, 16)))  # per frame

spec("UNetSpatioTemporalConditionModel",
     dict(block_out_channels=(32, 64), layers_per_block=1, in_channels=8, out_channels=4, cross_attention_dim=16,
          num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
          num_frames=2, down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
          up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
     lambda r: dict(sample=r.n(1, 2, 8, 8, 8), timestep=r.t(3.0), encoder_hidden_states=r.n(1, 1, 16),
                    added_time_ids=r.t(6.0, 127.0, 0.02).view(1, 3)))

spec("Kandinsky3UNet",
     dict(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=2,
          block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=32),
     lambda r: dict(sample=r.n(1, 4, 8, 8), timestep=r.t(3.0), encoder_hidden_states=r.n(1, 5, 32),
                    encoder_attention_mask=r.t([1, 1, 1, 1, 0])))

spec("UVit2DModel",
     dict(hidden_size=16, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=16,
          vocab_size=32, codebook_size=8, in_channels=16, block_out_channels=16, num_res_blocks=1, downsample=True,
          upsample=True, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
          sample_size=4),
     lambda r: dict(input_ids=r.i(8, 1, 4, 4), encoder_hidden_states=r.n(1, 5, 16), pooled_text_emb=r.n(1, 16),
                    micro_conds=r.n(1, 5)))

spec("I2VGenXLUNet",
     dict(UNET_SMALL, sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=4,
          down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
     lambda r: dict(sample=r.n(1, 4, 2, 8, 8), timestep=r.t(3.0), fps=r.t(8), image_latents=r.n(1, 4, 2, 8, 8),
                    image_embeddings=r.n(1, 16), encoder_hidden_states=r.n(1, 5, 16)))

spec("DreamLiteUNetModel",
     dict(block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=4,
          out_channels=4, cross_attention_dim=16, attention_head_dim=4, ff_mult=2),
     lambda r: dict(sample=r.n(1, 4, 8, 8), timestep=3, encoder_hidden_states=r.n(1, 5, 16)))

spec("DreamLiteTransformer2DModel",
     dict(num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1, norm_num_groups=4,
          cross_attention_dim=16),
     lambda r: dict(hidden_states=r.n(1, 8, 4, 4), encoder_hidden_states=r.n(1, 5, 16)))

spec("StableCascadeUNet",
     dict(in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2),
          down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_text_in_channels=16,
          clip_text_pooled_in_channels=16, clip_image_in_channels=16, clip_seq=2, switch_level=(False,),
          dropout=(0.0, 0.0)),
     lambda r: dict(sample=r.n(1, 4, 8, 8), timestep_ratio=r.t(0.5), clip_text_pooled=r.n(1, 1, 16),
                    clip_text=r.n(1, 5, 16), clip_img=r.n(1, 1, 16)))

# controlnets -----------------------------------------------------------------------------------

spec("ControlNetModel",
     dict(UNET_SMALL, in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          cross_attention_dim=16, attention_head_dim=4, conditioning_embedding_out_channels=(8, 16)),
     lambda r: dict(sample=r.n(1, 4, 8, 8), timestep=3, encoder_hidden_states=r.n(1, 5, 16),
                    controlnet_cond=r.n(1, 3, 16, 16)))


spec("ControlNetUnionModel",
     dict(UNET_SMALL, in_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          cross_attention_dim=16, attention_head_dim=4, conditioning_embedding_out_channels=(8, 16),
          num_control_type=2, num_trans_channel=8, num_trans_head=2, num_trans_layer=1, num_proj_channel=8,
          addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64),
     lambda r: dict(sample=r.n(1, 4, 8, 8), timestep=3, encoder_hidden_states=r.n(1, 5, 16),
                    added_cond_kwargs={"text_embeds": r.n(1, 16), "time_ids": r.n(1, 6)},
                    controlnet_cond=[r.n(1, 3, 16, 16), r.zeros(1, 3, 16, 16)], control_type=r.t(1.0, 0.0).view(1, 2),
                    control_type_idx=[0]))

spec("SparseControlNetModel",
     dict(UNET_SMALL, in_channels=4, conditioning_channels=4,
          down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), cross_attention_dim=16, attention_head_dim=4,
          conditioning_embedding_out_channels=(8, 16), motion_max_seq_length=8, motion_num_attention_heads=2),
     lambda r: dict(sample=r.n(1, 4, 2, 8, 8), timestep=3, encoder_hidden_states=r.n(2, 5, 16),
                    controlnet_cond=r.n(1, 4, 2, 8, 8), conditioning_mask=r.ones(1, 1, 2, 8, 8)))


# CosmosControlNetModel: the forward resizes its padding mask with torchvision (not a diffusers dependency,
# not installed here), so this spec builds but stops in the unpatched forward where torchvision is missing.
spec("CosmosControlNetModel",
     dict(n_controlnet_blocks=1, in_channels=4 + 1 + 1, latent_channels=4 + 1 + 1, model_channels=32,
          num_attention_heads=2, attention_head_dim=16, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
          patch_size=(1, 2, 2), max_size=(4, 16, 16), rope_scale=(2.0, 1.0, 1.0), extra_pos_embed_type=None,
          img_context_dim_in=16, img_context_dim_out=32, use_crossattn_projection=False),
     lambda r: dict(controls_latents=r.n(1, 4, 1, 8, 8), latents=r.n(1, 4, 1, 8, 8), timestep=r.t(0.5),
                    encoder_hidden_states=(r.n(1, 6, 16), r.n(1, 4, 16)), condition_mask=r.ones(1, 1, 1, 8, 8),
                    conditioning_scale=1.0, padding_mask=r.zeros(1, 1, 8, 8)))


ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])


def zimage_controlnet(cls, config):
    """ZImageControlNetModel runs on embedders copied from a ZImage transformer (from_transformer)."""
    import diffusers
    transformer = diffusers.ZImageTransformer2DModel(**ZIMAGE)
    return cls.from_transformer(controlnet=cls(**config), transformer=transformer)


spec("ZImageControlNetModel",
     dict(control_layers_places=[0], control_refiner_layers_places=[0],
          add_control_noise_refiner="control_noise_refiner", control_in_dim=4, dim=32, n_refiner_layers=1, n_heads=2,
          n_kv_heads=2),
     lambda r: dict(x=[r.n(4, 1, 8, 8)], t=r.t(0.5), cap_feats=[r.n(5, 16)], control_context=[r.n(4, 1, 8, 8)]),
     build=zimage_controlnet)


spec("UNetControlNetXSModel",
     dict(sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(4, 8), cross_attention_dim=8,
          transformer_layers_per_block=1, num_attention_heads=2, norm_num_groups=4, upcast_attention=False,
          ctrl_block_out_channels=[2, 4], ctrl_num_attention_heads=4, ctrl_max_norm_num_groups=2,
          ctrl_conditioning_embedding_out_channels=(2, 2)),
     lambda r: dict(sample=r.n(1, 4, 16, 16), timestep=r.t(10), encoder_hidden_states=r.n(1, 4, 8),
                    controlnet_cond=r.n(1, 3, 32, 32), conditioning_scale=1.0))


# autoencoders ----------------------------------------------------------------------------------

ENC2 = ("DownEncoderBlock2D", "DownEncoderBlock2D")
DEC2 = ("UpDecoderBlock2D", "UpDecoderBlock2D")
spec("AutoencoderKL",
     dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=ENC2, up_block_types=DEC2, latent_channels=4,
          sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AsymmetricAutoencoderKL",
     dict(down_block_types=ENC2, down_block_out_channels=(8, 16), up_block_types=DEC2, up_block_out_channels=(8, 16),
          norm_num_groups=4, latent_channels=4, sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("VQModel",
     dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=ENC2, up_block_types=DEC2, latent_channels=3,
          num_vq_embeddings=16, sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AutoencoderKLFlux2",
     dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=ENC2, up_block_types=DEC2, latent_channels=8,
          layers_per_block=1, sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AutoencoderKLTemporalDecoder",
     dict(block_out_channels=(32, 64), down_block_types=ENC2, layers_per_block=1, latent_channels=4, sample_size=16),
     lambda r: dict(sample=r.n(2, 3, 16, 16), num_frames=2))
spec("AutoencoderTiny",
     dict(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32), num_encoder_blocks=(1, 2),
          num_decoder_blocks=(2, 1)),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AutoencoderKLCogVideoX",
     dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
          temporal_compression_ratio=4),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLHunyuanVideo",
     dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLWan",
     dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLQwenImage",
     dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
     lambda r: dict(sample=r.n(1, 3, 1, 16, 16)))
spec("AutoencoderKLLTXVideo",
     dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
          layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
          spatio_temporal_scaling=(True, True, False, False),
          decoder_spatio_temporal_scaling=(True, True, False, False),
          decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
          upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
          encoder_causal=True, decoder_causal=False),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLMochi",
     dict(in_channels=15, out_channels=3, latent_channels=4, encoder_block_out_channels=(32, 32, 32, 32),
          decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1)),
     lambda r: dict(sample=r.n(1, 3, 7, 16, 16)))
spec("AutoencoderKLMagvit",
     dict(block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=8),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLCosmos",
     dict(encoder_block_out_channels=(8, 8, 8, 8), decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,),
          resolution=64, num_layers=2, patch_size=4, spatial_compression_ratio=4, temporal_compression_ratio=4),
     lambda r: dict(sample=r.n(1, 3, 9, 32, 32)))
spec("AutoencoderDC",
     dict(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
          decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
          decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
          encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
          upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu"),
     lambda r: dict(sample=r.n(1, 3, 32, 32)))
spec("AutoencoderOobleck",
     dict(encoder_hidden_size=12, decoder_channels=12, decoder_input_channels=6, audio_channels=2,
          downsampling_ratios=[2, 4], channel_multiples=[1, 2]),
     lambda r: dict(sample=r.n(1, 2, 24)))

# AutoencoderKLAllegro: no spec. Its encode only runs tiled, over fixed 24-frame tiles whose spatial overlap is
# 120 x 80 pixels, so the smallest input is (24, 128+, 128+): no tiny CPU run (harness limit).
spec("AutoencoderKLHunyuanImage",
     dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(32, 32, 32), layers_per_block=1,
          spatial_compression_ratio=4, sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AutoencoderKLHunyuanImageRefiner",
     dict(latent_channels=8, block_out_channels=(32, 32, 32), layers_per_block=1, spatial_compression_ratio=4),
     lambda r: dict(sample=r.n(1, 3, 5, 16, 16)))
spec("AutoencoderKLHunyuanVideo15",
     dict(latent_channels=8, block_out_channels=(32, 32, 32), layers_per_block=1, spatial_compression_ratio=4),
     lambda r: dict(sample=r.n(1, 3, 5, 16, 16)))
spec("AutoencoderKLKVAE",
     dict(channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, ch_mult=(1, 2), sample_size=16),
     lambda r: dict(sample=r.n(1, 3, 16, 16)))
spec("AutoencoderKLKVAEVideo",
     dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, temporal_compress_times=4),
     lambda r: dict(sample=r.n(1, 3, 5, 16, 16)))
spec("AutoencoderKLLTX2Video",
     dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8),
          layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1), patch_size=1,
          decoder_inject_noise=(False, False, False, False), upsample_residual=(False, False, False),
          upsample_factor=(1, 1, 1)),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("AutoencoderKLQwenImage21",
     dict(base_dim=4, decoder_base_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1),
     lambda r: dict(sample=r.n(1, 4, 1, 32, 32)))
spec("AutoencoderVidTok",
     dict(ch=16, ch_mult=[1, 2], z_channels=4, num_res_blocks=1),
     lambda r: dict(sample=r.n(1, 3, 9, 16, 16)))
spec("Kandinsky6SRVAE",
     dict(latent_channels=4, encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
          layers_per_block=1),
     lambda r: dict(sample=r.n(1, 3, 5, 16, 16)))
spec("AutoencoderKLMiniMaxH3",   # clip_length / token_drop as released: 17n + 5 frames -> 5n + 2 latent frames
     dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, spatial_downsample_factors=(2, 2),
          temporal_downsample_factors=(2, 2), norm_num_groups=8, decoder_num_layers=1, decoder_num_attention_heads=2,
          decoder_attention_head_dim=8, decoder_num_register_tokens=2, decoder_ffn_mult=2, clip_length=17,
          token_drop=3, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
     lambda r: dict(sample=r.n(1, 3, 22, 8, 8)))

spec("AutoencoderKLKVAEAudio",
     dict(encoder_dim=8, encoder_rates=[2, 2], latent_dim=16, codebook_dim=8, decoder_dim=16, decoder_rates=[2, 2],
          attn_num_heads=2),
     lambda r: dict(sample=r.n(1, 1, 64)))
spec("AutoencoderKLLTX2Audio",
     dict(base_channels=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, latent_channels=4, mel_bins=16,
          mid_block_add_attention=True),
     lambda r: dict(sample=r.n(1, 2, 16, 16)))
spec("AutoencoderKLMiniMaxH3Audio",
     dict(encoder_dim=8, encoder_rates=(2, 2), latent_dim=16, latent_channels=4, num_attention_heads=2, decoder_dim=16,
          decoder_rates=(2, 2), decoder_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,),
          resblock_dilation_sizes=((1,),)),
     lambda r: dict(sample=r.n(1, 1, 64)))
spec("AutoencoderSAME",
     dict(audio_channels=2, patch_size=4, encoder_channels=8, encoder_c_mults=(2,), encoder_strides=(2,),
          encoder_transformer_depths=(1,), latent_dim=8, dim_heads=8, ff_mult=2),
     lambda r: dict(sample=r.n(1, 2, 64)))
spec("LongCatAudioDiTVae",
     dict(channels=8, c_mults=[1, 2], strides=[2, 2], latent_dim=4, encoder_latent_dim=8, downsampling_ratio=4),
     lambda r: dict(sample=r.n(1, 1, 64)))
spec("MMAudioVAE",
     dict(mel_bins=16, latent_channels=4, hidden_channels=16, channel_multipliers=(1, 2), layers_per_block=1, n_fft=64,
          hop_length=16),
     lambda r: dict(sample=r.n(1, 512)))   # a waveform
spec("MMAudioVocoder",
     dict(num_mels=16, upsample_initial_channel=16, upsample_rates=(2, 2), upsample_kernel_sizes=(4, 4),
          resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),)),
     lambda r: dict(mel=r.n(1, 16, 8)))
spec("MiniMaxMusic3Vocoder",
     dict(latent_channels=8, decoder_input_dim=16, decoder_hidden_dim=16, upsampling_ratios=(2, 2)),
     lambda r: dict(latents=r.n(1, 8, 8)))

spec("ConsistencyDecoderVAE",
     dict(encoder_block_out_channels=[8, 16], encoder_in_channels=3, encoder_out_channels=4,
          encoder_down_block_types=["DownEncoderBlock2D"] * 2, decoder_add_attention=False,
          decoder_block_out_channels=[8, 16], decoder_down_block_types=["ResnetDownsampleBlock2D"] * 2,
          decoder_downsample_padding=1, decoder_in_channels=7, decoder_layers_per_block=1, decoder_norm_num_groups=4,
          encoder_norm_num_groups=4, decoder_num_train_timesteps=1024, decoder_out_channels=6,
          decoder_resnet_time_scale_shift="scale_shift", decoder_time_embedding_type="learned",
          decoder_up_block_types=["ResnetUpsampleBlock2D"] * 2, scaling_factor=1, latent_channels=4),
     lambda r: dict(sample=r.n(1, 3, 16, 16), generator=r.torch.Generator().manual_seed(0)))

spec("AutoencoderRAE",   # the DINOv2 encoder is built from its config (transformers), not downloaded
     dict(encoder_type="dinov2", encoder_hidden_size=128, encoder_patch_size=8, encoder_num_hidden_layers=1,
          decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
          decoder_intermediate_size=64, patch_size=4, encoder_input_size=32, image_size=16),
     lambda r: dict(sample=r.u(1, 3, 32, 32)))

spec("LTX2VideoDiffusionDecoderModel",   # neighbourhood attention: the smallest latent is 2 x 3 x 3
     dict(out_channels=3, latent_channels=8, patch_size=2, decoder_head_dim=16,
          decoder_stage_channels=(64, 32, 16, 16, 16), decoder_stage_depths=(1, 1, 1, 1, 2),
          decoder_stage_kernels=((3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
          decoder_upsample_strides=((1, 2, 2), (2, 1, 1), (2, 2, 2), (2, 2, 2)),
          decoder_upsample_channel_reductions=(2, 2, 1, 1), decoder_stage5_kernel=(3, 3, 3), decoder_t_emb_dim=32,
          spatial_compression_ratio=16, temporal_compression_ratio=8),
     lambda r: dict(z=r.n(1, 8, 2, 3, 3), generator=r.torch.Generator().manual_seed(0)))

spec("Cosmos3AVAEAudioTokenizer",
     dict(sampling_rate=16, hop_size=4, input_channels=1, stereo=True, normalize_volume=True, enc_dim=4,
          enc_num_blocks=1, enc_n_fft=8, enc_hop_length=2, enc_latent_dim=8, enc_c_mults=(1,), enc_strides=(2,),
          vocoder_input_dim=4, dec_dim=4, dec_c_mults=(1, 2), dec_strides=(2, 2), dec_out_channels=2),
     lambda r: dict(sample=r.n(1, 2, 16)))
spec("RFD4ProteinaAutoencoder",
     dict(latent_dim=4, n_residue_types=5, num_token_types=2, nlayers=1, token_dim=32, nheads=2, dim_cond=16,
          pair_repr_dim=8, token_type_emb_dim=8, encoder_feats_seq=("token_type",),
          decoder_feats_seq=("ca_coors_nm", "z_latent_seq", "token_type"),
          atom37_mask=[[True] * 4 + [False] * 33] * 5, allowed_residue_types=[[True] * 5, [True] * 5]),
     lambda r: dict(z_latent=r.n(1, 6, 4), ca_coors_nm=r.n(1, 6, 3), padding_mask=r.t([True] * 5 + [False]),
                    token_type=r.zeros(1, 6, dtype=r.torch.long),
                    conditioning={"is_in_context_conditioning": r.zeros(1, 6, dtype=r.torch.bool),
                                  "supports_local_latent": r.ones(1, 6, dtype=r.torch.bool)}))


# adapters, condition embedders, latent upscaler --------------------------------------------------

spec("MiniMaxMusic3ConditionEncoder",
     dict(condition_hidden_dim=32, num_condition_layers=1, out_dim=16),
     lambda r: dict(hidden_states=r.n(1, 8, 32)))
spec("AnimaTextConditioner",
     dict(source_dim=16, target_dim=16, model_dim=32, num_layers=1, num_attention_heads=2, target_vocab_size=16,
          min_sequence_length=8),
     lambda r: dict(source_hidden_states=r.n(1, 5, 16), target_input_ids=r.i(16, 1, 6)))
spec("Kandinsky6SRLatentUpscalerBank",
     dict(in_channels=4, stage_channels=(8, 8, 8), num_pre_blocks=1, num_mid_blocks=1, num_post_blocks=1,
          num_x2_adapter_blocks=1, scales=(2,)),
     lambda r: dict(latents=r.n(1, 4, 2, 4, 4), scale=2))
spec("T2IAdapter",
     dict(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter"),
     lambda r: dict(x=r.n(1, 3, 8, 8)))

# ---- running one class -------------------------------------------------------------------------

def classes() -> dict:
    """name -> class: the ModelMixin subclasses exported by diffusers.models."""
    import diffusers.models as dm
    from diffusers.models.modeling_utils import ModelMixin
    out = {}
    for n in sorted(dir(dm)):
        if n.startswith("_"):
            continue
        try:
            o = getattr(dm, n)
        except Exception:   # an optional dependency missing: not exported here
            continue
        if inspect.isclass(o) and issubclass(o, ModelMixin) and o is not ModelMixin:
            out[n] = o
    return out


def family(cls) -> str:
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["diffusers", "models"] else parts[-1]


def tensors(out) -> list:
    """Every tensor of a forward's output, in a fixed order (dataclass outputs, tuples, lists, dicts)."""
    import torch
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out):   # BaseOutput (its dict view drops a lone list field)
        return [t for f in dataclasses.fields(out) for t in tensors(getattr(out, f.name, None))]
    if isinstance(out, dict):   # BaseOutput is an OrderedDict of its non-None fields
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors(v)]
    return []


def clone(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, torch.Generator):   # each forward draws the same noise
        g = torch.Generator(x.device)
        g.set_state(x.get_state())
        return g
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def where_in_diffusers(e: BaseException) -> str:
    """file:line of the innermost frame of the exception (diffusers', layerzero's or torch's)."""
    tb = traceback.extract_tb(e.__traceback__)
    for fr in reversed(tb):
        f = fr.filename.replace("\\", "/")
        for root in ("layerzero/", "diffusers/", "torch/"):
            if root in f:
                return f"{root}{f.split(root, 1)[1]}:{fr.lineno} ({fr.name})"
    return f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""


class Stage(Exception):
    def __init__(self, stage, exc):
        super().__init__(f"{stage}: {exc}")
        self.stage, self.exc = stage, exc


def reinit(model, names=()) -> list:
    """Seeded normal(0, 0.02) values for
    - parameters named in `names`;
    - any parameter holding non-finite or absurd (> 1e4) values: memory torch.empty left as it was,
      which from_pretrained would fill;
    - any all-zero parameter other than a bias: zero-initialised output projections, gates and
      controlnet blocks (adaLN-Zero, zero_module) would make whole branches, or the output itself,
      identically zero, and a comparison against zero proves nothing.
    Returns the names changed."""
    import torch
    g = torch.Generator().manual_seed(0)
    done = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            zero = p.numel() > 1 and not n.endswith("bias") and not p.any()
            if zero or any(k in n for k in names) or not torch.isfinite(p).all() or p.abs().max() > 1e4:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                done.append(n)
    return done


# ---- a generic fallback for a class with no SPECS entry (a newer diffusers) ------------------------

_SHRINK = [   # (parameter-name pattern, tiny value) for int defaults; first match wins
    (r"(^|_)(num_)?(\w+_)?(layers|blocks|depth)$|^n_layers$|layers_per_block$", 1),
    (r"(^|_)(num_)?(key_value|kv)_heads$|^n_kv_heads$", 2),
    (r"(^|_)(num_)?(attention_)?heads$|^n_?heads$|^num_attention_heads$", 2),
    (r"head_dim$|attention_head_dim$|dim_head$", 8),
    (r"^(hidden_size|dim|model_dim|inner_dim|embed_dim)$", 16),
    (r"ffn|intermediate_size|ff_dim|ff_inner_dim", 32),
    (r"(cross_attention|joint_attention|pooled_projection|caption_projection|text_embed|text|caption|cap_feat"
     r"|context_in|encoder_hid|text_in|condition)_?(dim|channels|size)$", 16),
    (r"^(in|out)_channels$", 4),
    (r"^sample_size$", 8),
    (r"norm_num_groups$", 4),
]


_ROPE_AXES = {1: (8,), 2: (4, 4), 3: (2, 2, 4), 4: (2, 2, 2, 2)}


def generic_spec(cls) -> dict:
    """A best-effort tiny config and inputs from `cls.__init__` defaults and `forward`'s parameter names:
    int defaults shrunk by name (layers 1, heads 2, head_dim 8, widths 16...), rope axis tuples resized to
    the head dim, and inputs hidden_states/sample (B, C, H, W), encoder_hidden_states (B, S, D), timestep
    (B,), pooled_projections (B, D). Anything else required by forward fails the build (not built)."""
    import re
    cfg = {}
    for k, p in inspect.signature(cls.__init__).parameters.items():
        d = p.default
        if k == "self" or d is inspect.Parameter.empty or isinstance(d, bool):
            continue
        if isinstance(d, int):
            for pat, v in _SHRINK:
                if re.search(pat, k) and d > v:
                    cfg[k] = v
                    break
        elif (isinstance(d, (tuple, list)) and len(d) in _ROPE_AXES and all(isinstance(x, int) for x in d)
              and ("rope" in k or "axes_dim" in k)):
            cfg[k] = type(d)(_ROPE_AXES[len(d)])     # per-axis rotary dims summing to the head dim (8)
    text = next((cfg[k] for k in cfg if re.search(_SHRINK[6][0], k)), 16)
    pooled = cfg.get("pooled_projection_dim", 16)
    c = cfg.get("in_channels", 4)
    video = "3D" in cls.__name__ or "Video" in cls.__name__
    shape = (1, c, 2, 8, 8) if video else (1, c, 8, 8)

    def inputs(r):
        out = {}
        for k, p in inspect.signature(cls.forward).parameters.items():
            if k == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if k in ("hidden_states", "sample", "x"):
                out[k] = r.n(*shape)
            elif k == "encoder_hidden_states":
                out[k] = r.n(1, 5, text)
            elif k in ("timestep", "timesteps", "t"):
                out[k] = r.t(3.0)
            elif k in ("pooled_projections", "pooled_embeds"):
                out[k] = r.n(1, pooled)
            elif p.default is inspect.Parameter.empty:
                raise TypeError(f"generic fallback: no rule for forward's required argument {k!r}")
        return out
    return {"config": cfg, "inputs": inputs, "build": None, "reinit": (), "generic": True}


def build(name):
    """(model, inputs) for class `name` from SPECS, else from `generic_spec` (raises Stage('build', ...))."""
    import torch
    import diffusers.models as dm
    cls = getattr(dm, name)
    s = SPECS.get(name) or generic_spec(cls)
    try:
        torch.manual_seed(0)
        model = (s["build"] or (lambda c, cfg: c(**cfg)))(cls, dict(s["config"]))
        model = model.eval()
        model._zoo_reinit = reinit(model, s["reinit"])
        if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
            model = model.float()
        inputs = s["inputs"](R(1))
    except Exception as e:
        raise Stage("build", e) from e
    return model, inputs


def forward(model, inputs):
    import torch
    torch.manual_seed(0)
    with torch.no_grad():
        return tensors(model(**clone(inputs)))


def compare(got, want) -> tuple[bool, float, str]:
    """(close, max abs diff, why not)."""
    import torch
    if len(got) != len(want):
        return False, math.inf, f"{len(got)} output tensors, reference has {len(want)}"
    worst, why = 0.0, ""
    ok = True
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return False, math.inf, f"output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                ok, why = False, f"output {i} (integer) differs"
            continue
        d = (a.double() - b.double()).abs()
        m = d.max().item() if d.numel() else 0.0
        if math.isnan(m) or not torch.allclose(a, b, **TOL, equal_nan=True):
            if ok:
                why = f"output {i} {tuple(a.shape)}: max abs diff {m:.3g}"
            ok = False
        worst = max(worst, m) if not math.isnan(m) else math.inf
    return ok, worst, why


def bit_equal(got, want) -> bool:
    import torch
    return len(got) == len(want) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))


def _calls():
    import layerzero as lz
    return {op: dict(k) for op, k in lz.metrics()["calls"].items()}


def _ran(calls) -> dict:
    """op -> number of LayerZero calls (diffusers' own apply_rotary_emb fallback not counted)."""
    return {op: sum(n for k, n in ks.items() if not k.startswith("diffusers.")) for op, ks in calls.items()}


def _judge(res: dict, out, ref) -> None:
    """Record a route's LayerZero calls and its outputs' difference from the reference."""
    res["calls"] = _ran(_calls())
    ok, diff, why = compare(out, ref)
    res["max_diff"] = diff
    if not ok:
        res.update(status="changed", why=why)


def route_patch(model, inputs, ref) -> dict:
    import layerzero as lz
    res = {"status": "ok"}
    m = copy.deepcopy(model)
    try:
        report = lz.patch(m)
    except Exception as e:
        return {"status": "raises", "where": "lz.patch", "error": first_line(e), "at": where_in_diffusers(e)}
    res["patched"] = {k: sum(1 for i in report.patched if i.kind == k) for k in KINDS}
    res["skipped"] = {k: sum(1 for i in report.skipped if i.kind == k) for k in KINDS}
    res["skipped_why"] = sorted({i.detail.split(";")[0][:160] for i in report.skipped})[:6]
    # attention modules (anything with a diffusers `processor`) the report names neither patched nor skipped
    named = {i.name for i in report.items if i.kind == "attention"}
    silent = [n for n, mod in m.named_modules() if getattr(mod, "processor", None) is not None and n not in named]
    if silent:
        res["attention_unreported"] = {"count": len(silent), "classes": sorted({type(m.get_submodule(n)).__name__
                                                                                for n in silent}), "first": silent[0]}
    lz.reset_metrics()
    try:
        out = forward(m, inputs)
    except Exception as e:
        try:
            lz.unpatch(m)
        except Exception:
            pass
        return dict(res, status="raises", where="patched forward", error=first_line(e), at=where_in_diffusers(e))
    _judge(res, out, ref)
    try:
        lz.unpatch(m)
        lz.reset_metrics()
        again = forward(m, inputs)
    except Exception as e:
        return dict(res, status="raises", where="unpatch", error=first_line(e), at=where_in_diffusers(e))
    res["unpatch_exact"] = bit_equal(again, ref)
    leftover = _ran(_calls())
    if any(leftover.values()):
        res["unpatch_exact"] = False
        res["why"] = (res.get("why", "") + f" unpatched model still calls LayerZero: {leftover}").strip()
    if not res["unpatch_exact"] and res["status"] == "ok":
        res["status"] = "changed"
        res.setdefault("why", "unpatch is not bit-exact")
    return res


def route_backend(model, inputs, ref) -> dict:
    import layerzero as lz
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry
    res = {"status": "ok"}
    # processors that take a dispatcher backend, with the one each has now (None, or its own choice such as
    # "flex"): restored exactly afterwards (reset_attention_backend() would set every one to None)
    saved = [(p, p._attention_backend) for p in {id(mod.processor): mod.processor for mod in model.modules()
                                                  if hasattr(getattr(mod, "processor", None), "_attention_backend")
                                                  }.values()]
    res["processors_with_backend"] = len(saved)
    active = registry._active_backend
    try:
        try:
            model.set_attention_backend("layerzero")
        except Exception as e:
            return dict(res, status="raises", where="set_attention_backend", error=first_line(e),
                        at=where_in_diffusers(e))
        lz.reset_metrics()
        try:
            out = forward(model, inputs)
        except ValueError as e:   # a processor that runs only one backend says so: refused, not wrong
            if not REFUSAL.search(str(e)):
                return dict(res, status="raises", where="backend forward", error=first_line(e),
                            at=where_in_diffusers(e))
            out = None
            res.update(status="refused", why=first_line(e))
        except Exception as e:
            return dict(res, status="raises", where="backend forward", error=first_line(e), at=where_in_diffusers(e))
        if out is not None:
            _judge(res, out, ref)
    finally:
        for proc, backend in saved:
            proc._attention_backend = backend
        registry.set_active_backend(active)   # set_attention_backend also sets it process-wide
    lz.reset_metrics()
    again = forward(model, inputs)
    res["reset_exact"] = bit_equal(again, ref) and not any(_ran(_calls()).values())
    if not res["reset_exact"] and res["status"] == "ok":
        res.update(status="changed", why="reset_attention_backend is not bit-exact")
    return res


# diffusers' processors that take one backend only raise "... requires the 'flex' attention backend"
REFUSAL = re.compile(r"requires the '\w+' attention backend")


def run_class(name: str, routes=("patch", "backend")) -> dict:
    """Everything about one class, as a JSON-able dict (never raises)."""
    import importlib
    import diffusers.models as dm
    importlib.import_module("layerzero")    # registers the "layerzero" backend with diffusers' dispatcher
    t0 = time.perf_counter()
    cls = getattr(dm, name)
    res = {"class": name, "family": family(cls), "routes": {}}
    if name in NOT_APPLICABLE:
        return dict(res, status="not applicable", error=NOT_APPLICABLE[name], seconds=0.0)
    try:
        model, inputs = build(name)
    except Stage as s:
        return dict(res, status="not built", where="build", error=first_line(s.exc), at=where_in_diffusers(s.exc),
                    seconds=round(time.perf_counter() - t0, 2), spec="SPECS" if name in SPECS else "generic")
    res["spec"] = "SPECS" if name in SPECS else "generic"
    try:
        ref = forward(model, inputs)
        if not ref:
            raise TypeError(f"the output holds no tensor ({type(model(**clone(inputs))).__name__})")
        if not bit_equal(forward(model, inputs), ref):
            raise RuntimeError("two unpatched forwards differ (the model is not deterministic)")
    except Exception as e:
        return dict(res, status="not built", where="unpatched forward", error=first_line(e),
                    at=where_in_diffusers(e), seconds=round(time.perf_counter() - t0, 2))
    res["params"] = sum(p.numel() for p in model.parameters())
    res["reinit"] = len(getattr(model, "_zoo_reinit", ()))
    res["trivial_outputs"] = [i for i, t in enumerate(ref) if t.is_floating_point() and t.numel() > 1
                              and bool((t == t.flatten()[0]).all())]
    res["outputs"] = [list(t.shape) for t in ref][:4]
    for route in routes:
        fn = route_patch if route == "patch" else route_backend
        try:
            res["routes"][route] = fn(model, inputs, ref)
        except Exception as e:
            res["routes"][route] = {"status": "raises", "where": route, "error": first_line(e),
                                    "at": where_in_diffusers(e)}
    statuses = [r["status"] for r in res["routes"].values()]
    res["status"] = "raises" if "raises" in statuses else "changed" if "changed" in statuses else "ok"
    res["attention_engaged"] = {r: bool(v.get("calls", {}).get("attention")) for r, v in res["routes"].items()}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


# ---- workers, output ---------------------------------------------------------------------------

def threads():
    """One torch thread (ZOO_THREADS): these tiny models run many times slower with more on a small
    shared CPU (a 2-core machine: 32 s instead of 1 s for UNet3DConditionModel)."""
    import torch
    torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))


def quiet():
    """No diffusers/LayerZero warnings (the experimental-backend notice on every call...)."""
    threads()
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
    except Exception:
        pass


def _worker(conn, routes):
    quiet()
    while True:
        name = conn.recv()
        if name is None:
            return
        try:
            res = run_class(name, routes)
        except BaseException as e:   # run_class does not raise; belt and braces
            res = {"class": name, "status": "raises", "where": "harness", "error": first_line(e)}
        conn.send(res)


class Worker:
    def __init__(self, ctx, routes):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, routes), daemon=True)
        self.proc.start()
        self.name, self.since, self.fresh = None, None, True

    def start(self, name):
        self.name, self.since = name, time.perf_counter()
        self.conn.send(name)

    def stop(self):
        try:
            self.conn.send(None)
        except Exception:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_all(names, routes, timeout, jobs, on_result=None, families=None) -> list:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    todo, results = list(names), {}
    workers = [Worker(ctx, routes) for _ in range(max(1, min(jobs, len(todo))))]
    t_import = timeout + 60       # the first class of a worker also imports torch + diffusers
    try:
        for w in workers:
            if todo:
                w.start(todo.pop(0))
        while any(w.name for w in workers):
            for i, w in enumerate(workers):
                if w.name is None:
                    continue
                limit = t_import if w.fresh else timeout
                res = None
                try:
                    if w.conn.poll(0.2):
                        res = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join(1)
                    res = {"class": w.name, "status": "raises", "where": "worker",
                           "error": f"worker process died (exit code {w.proc.exitcode})"}
                if res is None and time.perf_counter() - w.since > limit:
                    res = {"class": w.name, "status": "raises", "where": "timeout",
                           "error": f"no result within {limit:.0f} s (killed)", "seconds": round(limit, 1)}
                if res is None:
                    continue
                res.setdefault("family", (families or {}).get(res["class"], "?"))
                results[res["class"]] = res
                if on_result:
                    on_result(res)
                if res.get("where") in ("worker", "timeout"):
                    w.proc.kill()
                    w.proc.join()
                    workers[i] = w = Worker(ctx, routes)
                else:
                    w.fresh = False
                w.name = None
                if todo:
                    w.start(todo.pop(0))
    finally:
        for w in workers:
            w.stop()
    return [results[n] for n in names if n in results]


CATEGORIES = ("ok", "changed", "raises", "not built", "not applicable")


def line(res) -> str:
    """One line per class for the summary lists."""
    name, st = res["class"], res["status"]
    if st in ("not built", "not applicable") or "routes" not in res or not res["routes"]:
        at = f" [{res['where']}{' @ ' + res['at'] if res.get('at') else ''}]" if res.get("where") else ""
        return f"{name} ({res.get('family', '?')}){at}: {res.get('error', '')}"
    parts = []
    for route, r in res["routes"].items():
        calls = r.get("calls", {})
        eng = ",".join(f"{op}x{n}" for op, n in sorted(calls.items()) if n) or "nothing"
        if r["status"] == "raises":
            parts.append(f"{route}: raises in {r['where']}{' @ ' + r['at'] if r.get('at') else ''}: {r['error']}")
        else:
            d = r.get("max_diff")
            exact = r.get("unpatch_exact", r.get("reset_exact"))
            diff = "-" if d is None else f"{d:.2g}"
            parts.append(f"{route}: {r['status']} diff={diff} exact={exact} ran={eng}"
                         + (f" ({r['why']})" if r.get("why") else ""))
    return f"{name} ({res['family']}, {res.get('seconds', 0):.1f}s): " + " | ".join(parts)


def markdown(results) -> str:
    rows = ["| class | family | status | patch: max diff | unpatch exact | attention | norm | rope | mlp "
            "| lz ops ran (patch) | backend: max diff | backend: lz attention calls | reset exact | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        p, b = res.get("routes", {}).get("patch", {}), res.get("routes", {}).get("backend", {})
        pat, sk = p.get("patched", {}), p.get("skipped", {})

        def cell(k):
            if not p.get("patched"):
                return ""
            return f"{pat.get(k, 0)}" + (f" (+{sk[k]} skipped)" if sk.get(k) else "")

        def fmt(d):
            return "" if d is None else f"{d:.1e}"
        ran = ", ".join(f"{op} {n}" for op, n in sorted(p.get("calls", {}).items()) if n)
        note = res.get("error", "") or "; ".join(
            r.get("why") or (f"{r['where']}: {r['error']}" if r.get("error") else "")
            for r in res.get("routes", {}).values() if r["status"] != "ok")
        un = p.get("attention_unreported")
        if un:
            note = (note + "; " if note else "") + f"{un['count']} attention module(s) not in the report " \
                f"({', '.join(un['classes'])})"
        rows.append(f"| {res['class']} | {res.get('family', '')} | {res['status']} | {fmt(p.get('max_diff'))} "
                    f"| {p.get('unpatch_exact', '')} | {cell('attention')} | {cell('norm')} | {cell('rope')} "
                    f"| {cell('mlp')} | {ran} | {fmt(b.get('max_diff'))} | {b.get('calls', {}).get('attention', '')} "
                    f"| {b.get('reset_exact', '')} | {note.replace('|', '/')[:200]} |")
    return "\n".join(rows) + "\n"


def summary(results) -> str:
    out = []
    by = {c: [r for r in results if r["status"] == c] for c in CATEGORIES}
    out.append("summary: " + ", ".join(f"{c} {len(v)}" for c, v in by.items()) + f" (of {len(results)})")
    eng = [r["class"] for r in results if any(r.get("attention_engaged", {}).values())]
    out.append(f"LayerZero attention ran in {len(eng)} classes; patch route: "
               f"{sum(1 for r in results if r.get('attention_engaged', {}).get('patch'))}, backend route: "
               f"{sum(1 for r in results if r.get('attention_engaged', {}).get('backend'))}")
    for c, v in by.items():
        if v:
            out.append(f"\n== {c} ({len(v)})")
            out.extend("  " + line(r) for r in v)
    quiet_ones = [r for r in results if "patch" in r.get("routes", {}) and r["status"] == "ok"
                  and not r["routes"]["patch"].get("calls", {}).get("attention")]
    if quiet_ones:
        out.append(f"\n== ok, but no LayerZero attention call in the patch route ({len(quiet_ones)})")
        for r in quiet_ones:
            p = r["routes"]["patch"]
            why = [w for w in p.get("skipped_why", []) if "ttention" in w or "rotary" in w]
            un = p.get("attention_unreported")
            note = (f"{un['count']} attention module(s) neither patched nor reported ({', '.join(un['classes'])})"
                    if un else "; ".join(why) or "no module with a diffusers attention processor (any attention "
                    "is a module's own forward code)")
            out.append(f"  {r['class']} ({r['family']}): {note}")
    unrep = [r for r in results if r.get("routes", {}).get("patch", {}).get("attention_unreported")]
    if unrep:
        out.append(f"\n== attention modules lz.patch neither patched nor reported ({len(unrep)})")
        for r in unrep:
            un = r["routes"]["patch"]["attention_unreported"]
            out.append(f"  {r['class']}: {un['count']} x {', '.join(un['classes'])} (e.g. {un['first']})")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these classes only")
    ap.add_argument("--family", nargs="+", help="these families only (transformers, unets, controlnets, ...)")
    ap.add_argument("--routes", nargs="+", default=["patch", "backend"], choices=["patch", "backend"])
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write a table class x engagement as Markdown")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per class (default 180)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--inprocess", action="store_true", help="no worker processes (no timeout)")
    ap.add_argument("--list", action="store_true", help="list the classes and exit")
    args = ap.parse_args(argv)

    found = classes()
    names = list(found)
    if args.only:
        missing = [n for n in args.only if n not in found]
        if missing:
            ap.error(f"not a diffusers.models ModelMixin class: {', '.join(missing)}")
        names = args.only
    if args.family:
        names = [n for n in names if family(found[n]) in args.family]
    if args.list:
        for n in names:
            print(f"{n:45s} {family(found[n]):20s} {'spec' if n in SPECS else 'n/a' if n in NOT_APPLICABLE else '-'}")
        return None
    quiet()
    import diffusers
    import torch
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}: {len(names)} classes, "
          f"routes {args.routes}", flush=True)
    t0 = time.perf_counter()

    def show(res):
        print(f"[{time.perf_counter() - t0:6.1f}s] {res['status']:14s} {line(res)}", flush=True)

    if args.inprocess:
        results = []
        for n in names:
            results.append(run_class(n, tuple(args.routes)))
            show(results[-1])
    else:
        results = run_all(names, tuple(args.routes), args.timeout, args.jobs, show,
                          {n: family(found[n]) for n in names})
    wall = time.perf_counter() - t0
    print()
    print(summary(results))
    print(f"\nwall time {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "tolerance": TOL,
                       "wall_seconds": round(wall, 1), "results": results}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results))
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
