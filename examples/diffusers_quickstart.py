"""LayerZero in a diffusers pipeline: patch it, see what runs, unpatch it.

Builds a tiny Stable-Diffusion-style pipeline from configs (random weights, no downloads) so it
runs anywhere in seconds; with a real checkpoint the calls are the same:

    pipe = StableDiffusionPipeline.from_pretrained("...", torch_dtype=torch.bfloat16).to("cuda")
    lz.patch(pipe)

Run: python examples/diffusers_quickstart.py
"""
from __future__ import annotations

import string

import torch

import layerzero as lz


def tiny_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:   # a character-level CLIP vocabulary: no files needed
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_hidden_layers=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        unet=UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=AutoencoderKL(
            block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def generate(pipe):
    return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def main():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)

    report = lz.patch(pipe)          # every model in the pipeline: unet, vae, text encoder
    print(report)                    # what was patched, what was left and why
    lz.reset_metrics()
    after = generate(pipe)
    print("kernels that ran:", lz.metrics()["calls"])
    explained = str(lz.explain(pipe.unet)).splitlines()  # per patched module: kernel, shapes, why
    print("\n".join(explained[:3] + [f"  ... ({len(explained) - 3} more)"]))
    print("max |patched - unpatched| =", (after - before).abs().max().item())

    lz.unpatch(pipe)
    print("unpatched output is bit-identical:", torch.equal(generate(pipe), before))

    # Attention only, through diffusers' own dispatcher (processors that call dispatch_attention_fn):
    #   model.set_attention_backend("layerzero")
    #   with diffusers.models.attention_dispatch.attention_backend("layerzero"): ...


if __name__ == "__main__":
    main()
