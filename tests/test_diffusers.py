"""lz.patch on diffusers models and pipelines (tiny, built from configs, CPU, fp32), and the
"layerzero" attention backend in diffusers' dispatcher."""
from __future__ import annotations

import string

import pytest
import torch

import layerzero as lz

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from layerzero.integrations import diffusers as lzd  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: patched vs unpatched


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm").eval()


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()


def run_unet(unet, mask=True):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) if mask else None  # (B, S_text), 1 = attend
    with torch.no_grad():
        return unet(x, 3, ctx, encoder_attention_mask=pad).sample


def run_sd3(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g),
                     torch.randn(1, 16, generator=g), torch.tensor([3])).sample


def run_flux(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(16, 1), ids.float()], -1)          # (S_img, 3): (0, row, col)
    with torch.no_grad():
        return model(torch.randn(1, 16, 8, generator=g), torch.randn(1, 4, 16, generator=g),
                     torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=img_ids,
                     txt_ids=torch.zeros(4, 3)).sample


def check_roundtrip(model, run, ops):
    """Patched output == unpatched within fp32 tolerance, LayerZero ran `ops`, unpatch is exact.
    Returns (report, metrics of the patched run)."""
    before = run(model)
    report = lz.patch(model)
    assert lz.patch(model) is report  # idempotent
    lz.reset_metrics()
    patched = run(model)
    calls = lz.metrics()["calls"]
    torch.testing.assert_close(patched, before, **TOL)
    for op in ops:
        assert sum(calls.get(op, {}).values()) > 0, f"no lz.{op} call ran: {calls}"
    lz.unpatch(model)
    lz.reset_metrics()
    assert torch.equal(run(model), before)
    assert lz.metrics()["calls"] == {}, "an unpatched model still calls LayerZero"
    return report, calls


def items(report, kind, status="patched"):
    return [i for i in report.items if i.kind == kind and i.status == status]


def test_unet_cross_attention_mask_geglu():
    unet = tiny_unet()
    assert not torch.allclose(run_unet(unet), run_unet(unet, mask=False))  # the mask matters
    report, calls = check_roundtrip(unet, run_unet, ("attention", "layer_norm", "geglu"))
    attn = items(report, "attention")
    assert len(attn) == 8 and all("AttnProcessor2_0" in i.detail for i in attn)
    assert {i.name.rsplit(".", 1)[1] for i in attn} == {"attn1", "attn2"}   # self + cross attention
    assert len(items(report, "mlp")) == 4 and all(i.op == "geglu" for i in items(report, "mlp"))
    assert sum(calls["attention"].values()) == 8 and sum(calls["geglu"].values()) == 4
    # the padding mask reached lz.attention (as diffusers' additive float mask)
    lz.patch(unet)
    run_unet(unet)
    assert "mask=float" in str(lz.explain(unet))
    lz.unpatch(unet)


def test_sd3_joint_attention_and_qk_rms_norm():
    model = tiny_sd3()
    report, calls = check_roundtrip(model, run_sd3, ("attention", "rms_norm", "layer_norm"))
    attn = items(report, "attention")
    assert len(attn) == 2 and all("JointAttnProcessor2_0" in i.detail for i in attn)
    assert {i.name.rsplit(".", 1)[1] for i in items(report, "norm") if i.op == "rms_norm"} == {
        "norm_q", "norm_k", "norm_added_q", "norm_added_k"}
    assert any(i.name.endswith("norm1.norm") for i in items(report, "norm"))  # inside AdaLayerNormZero
    skipped = items(report, "mlp", "skipped")
    assert skipped and all("not gated" in i.detail for i in skipped)        # GELU feed-forwards, with why
    assert sum(calls["attention"].values()) == 2


def test_flux_rope_and_qk_norm():
    model = tiny_flux()
    report, calls = check_roundtrip(model, run_flux, ("attention", "rms_norm", "rope", "layer_norm"))
    assert len(items(report, "attention")) == 2
    assert all("dispatch_attention_fn" in i.detail for i in items(report, "attention"))
    (rope,) = items(report, "rope")
    assert "FluxAttnProcessor" in rope.name
    assert sum(calls["rope"].values()) == 4                                 # q and k of 2 blocks
    assert "diffusers.apply_rotary_emb" not in calls["rope"]                # no fallback


def test_patch_options_and_unsupported_processor():
    unet = tiny_unet()
    report = lz.patch(unet, attention=False, mlp=False)
    assert not items(report, "attention") and not items(report, "mlp") and items(report, "norm")
    lz.unpatch(unet)
    unet.set_attn_processor(AttnProcessor())  # bmm + softmax: nothing LayerZero can stand in for
    before = run_unet(unet)
    report = lz.patch(unet)
    skipped = items(report, "attention", "skipped")
    assert len(skipped) == 8 and all("without F.scaled_dot_product_attention" in i.detail for i in skipped)
    torch.testing.assert_close(run_unet(unet), before, **TOL)
    lz.unpatch(unet)
    assert torch.equal(run_unet(unet), before)


def test_layerzero_backend_in_diffusers_dispatcher():
    model = tiny_flux()
    native = run_flux(model)
    registry = diffusers.models.attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend
    model.set_attention_backend("layerzero")    # the registered "layerzero" member
    try:
        lz.reset_metrics()
        torch.testing.assert_close(run_flux(model), native, **TOL)
        assert sum(lz.metrics()["calls"]["attention"].values()) == 2
    finally:
        model.reset_attention_backend()
        registry.set_active_backend(active)     # set_attention_backend also sets it process-wide

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))   # (B, S, H, D)
    pad = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])             # (B, S_k): the 2-D form
    want = dispatch_attention_fn(q, k, v, attn_mask=pad, backend="native")
    lz.reset_metrics()
    with attention_backend("layerzero"):
        got = dispatch_attention_fn(q, k, v, attn_mask=pad)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, dispatch_attention_fn(q, k, v, backend="native"))
    assert sum(lz.metrics()["calls"]["attention"].values()) == 1
    # nothing is dropped: what LayerZero cannot apply raises (diffusers would filter it out)
    with pytest.raises(TypeError, match="window_size"):
        dispatch_attention_fn(q, k, v, attention_kwargs={"window_size": (2, 2)}, backend="layerzero")
    with pytest.raises(ValueError, match="return_lse"):
        dispatch_attention_fn(q, k, v, attention_kwargs={"return_lse": True}, backend="layerzero")
    with pytest.raises(ValueError, match="context parallelism"):
        lzd.dispatch_attention_fn(q, k, v, parallel_config=object())


def test_sdpa_stand_in_matches_torch():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    F = torch.nn.functional
    bool_mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    bool_mask[..., 0] = True
    add_mask = torch.randn(2, 3, 6, 6, generator=g)
    for kw in ({}, {"attn_mask": bool_mask}, {"attn_mask": add_mask}, {"is_causal": True}, {"scale": 0.3}):
        torch.testing.assert_close(lzd.scaled_dot_product_attention(q, k, v, **kw),
                                   F.scaled_dot_product_attention(q, k, v, **kw), **TOL)
    torch.testing.assert_close(lzd.scaled_dot_product_attention(q[0], k[0], v[0]),           # (N, S, D)
                               F.scaled_dot_product_attention(q[0], k[0], v[0]), **TOL)
    assert lzd.functional.scaled_dot_product_attention is lzd.scaled_dot_product_attention
    assert lzd.functional.gelu is F.gelu


@pytest.mark.parametrize("sequence_dim", [1, 2])
@pytest.mark.parametrize("unbind", [-1, -2])
def test_rotary_stand_in(sequence_dim, unbind):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 7, 16, generator=g) if sequence_dim == 2 else torch.randn(2, 7, 3, 16, generator=g)
    theta = torch.randn(7, 8, generator=g)
    ang = theta.repeat_interleave(2, -1) if unbind == -1 else torch.cat((theta, theta), -1)
    freqs = (ang.cos(), ang.sin())
    fn = lzd._rotary(apply_rotary_emb, lz.rope)
    lz.reset_metrics()
    torch.testing.assert_close(fn(x, freqs, True, unbind, sequence_dim),
                               apply_rotary_emb(x, freqs, True, unbind, sequence_dim), **TOL)
    assert "diffusers.apply_rotary_emb" not in lz.metrics()["calls"]["rope"]
    # a form lz.rope does not take (complex freqs) runs diffusers' code, and is counted
    cplx = torch.polar(torch.ones(1, 7, 8), theta[None])                     # (B, S, D/2) complex
    y = x.transpose(1, 2) if sequence_dim == 2 else x                       # (B, S, H, D)
    torch.testing.assert_close(fn(y, cplx, use_real=False), apply_rotary_emb(y, cplx, use_real=False))
    assert lz.metrics()["calls"]["rope"]["diffusers.apply_rotary_emb"] == 1


def tiny_pipeline():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:              # single letters, word-final or not; no merges
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=8, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=16).eval()
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                             unet=tiny_unet(), scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe):
    return pipe("a cat", num_inference_steps=2, guidance_scale=2.0, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_stable_diffusion_pipeline_end_to_end():
    pipe = tiny_pipeline()
    report, calls = check_roundtrip(pipe, run_pipe, ("attention", "layer_norm", "geglu"))
    names = {i.name.split(".", 1)[0] for i in report.patched}
    assert names == {"unet", "vae", "text_encoder"}
    assert {i.name for i in items(report, "attention")} >= {
        "vae.decoder.mid_block.attentions.0", "text_encoder.encoder.layers.0.self_attn",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2"}
    # 2 steps x 8 UNet attentions (the CFG batch is one call) + 2 prompts x 2 CLIP layers + the VAE decoder
    assert sum(calls["attention"].values()) == 2 * 8 + 2 * 2 + 1
    assert "DDIMScheduler" in report.untouched and "CLIPTokenizer" in report.untouched
    assert lzd.patch_diffusers(pipe) is lz.patch(pipe)
    lz.unpatch(pipe)
    assert lz.patch(pipe.unet) is not None and lz.patch(pipe, mlp=False).options["mlp"] is False
    lz.unpatch(pipe)


def test_quickstart_and_benchmark_smoke(tmp_path, capsys):
    import importlib.util
    import json
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runpy.run_path(os.path.join(root, "examples", "diffusers_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "lz.patch(StableDiffusionPipeline)" in out and "bit-identical: True" in out

    spec = importlib.util.spec_from_file_location("e2e_diffusers", os.path.join(root, "benchmarks", "e2e_diffusers.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--json", str(tmp_path / "e2e.json")])
    assert json.loads((tmp_path / "e2e.json").read_text())["results"].keys() == {
        "native", "layerzero-backend", "layerzero", "native+compile", "layerzero+compile"}
    lzr = result["results"]["layerzero"]
    assert lzr["max_abs_diff_vs_native"] < 1e-4 and {"attention", "rms_norm", "rope"} <= set(lzr["kernels"])
    for name in ("native+compile", "layerzero+compile"):   # a child process each, backend="eager"
        r = result["results"][name]
        assert "error" not in r, r
        assert r["compile_backend"] == "eager" and r["ms"] > 0 and r["unique_graphs"] >= 1, r
        assert r["max_abs_diff_vs_native"] < 1e-4, r
    lzc = result["results"]["layerzero+compile"]
    assert {"attention", "rms_norm", "rope"} <= set(lzc["kernels"]) and "ratio_vs_native_compile" in lzc
    assert result["compile_ratio"] == lzc["ratio_vs_native_compile"] and result["compile_goal"] == 0.9
    out = capsys.readouterr().out
    assert "ratio t(layerzero)/t(native)" in out and "ratio t(layerzero+compile)/t(native+compile)" in out


def test_patched_model_compiles_fullgraph():
    """Rebound processor globals live in a real module, so torch.compile's guards on them hold."""
    model = tiny_flux()
    before = run_flux(model)
    lz.patch(model)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(run_flux(compiled), before, **TOL)
    finally:
        torch._dynamo.reset()
        lz.unpatch(model)


def test_backend_registered_when_diffusers_is_imported_first():
    import subprocess
    import sys

    code = ("from diffusers import FluxTransformer2DModel; import layerzero; "
            "from diffusers.models.attention_dispatch import AttentionBackendName as N, _AttentionBackendRegistry as R; "
            "assert N('layerzero') in R._backends, R._backends")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explain_pipeline_lists_each_component():
    pipe = tiny_pipeline()
    lz.patch(pipe)
    try:
        run_pipe(pipe)
        e = lz.explain(pipe)
        modules = {r["module"] for r in e.rows}
        assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2" in modules
        assert any(m.startswith("text_encoder.") for m in modules)
        ran = {k["kernel"] for r in e.rows for k in r["kernels"]}
        assert ran & {"torch.sdpa", "torch.sdpa_flash", "reference.attention"}
        assert "StableDiffusionPipeline" in str(e)
    finally:
        lz.unpatch(pipe)


def test_explain_lists_only_the_shapes_each_module_saw():
    """The UNet's self-attention (attn1) and cross-attention (attn2) share head sizes: attn1 shows
    its own Sq == Sk calls only, attn2 its text-length Sk."""
    unet = tiny_unet()
    lz.patch(unet)
    try:
        run_unet(unet)
        rows = {r["module"]: " ".join(k["shapes"] for k in r["kernels"]) for r in lz.explain(unet).rows}
        block = "down_blocks.0.attentions.0.transformer_blocks.0"
        self_attn, cross = rows[f"{block}.attn1"], rows[f"{block}.attn2"]
        assert "Sq=64 Sk=64" in self_attn and "Sk=5" not in self_attn, self_attn
        assert "Sq=64 Sk=5" in cross and "Sk=64" not in cross, cross
        ff = rows[f"{block}.ff"]
        assert "rows=128 " in ff and "rows=32 " not in ff, ff   # not the up block's 4x4 tokens
    finally:
        lz.unpatch(unet)
    assert not any("_lz_seen" in vars(m) for m in unet.modules())


def test_patch_on_meta_device_reports_what_it_cannot_probe():
    with torch.device("meta"):
        unet = tiny_unet()
        report = lz.patch(unet)       # probe inputs stay off the meta device
    assert {i.kind for i in report.skipped if "meta device" in i.detail} == {"norm", "mlp"}, str(report)
    assert items(report, "attention")
    lz.unpatch(unet)
