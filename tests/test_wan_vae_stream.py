"""Streaming Wan VAE: one chunk per call, caches as tensors, parity with diffusers and with ONNX Runtime.

Tiny preset (Wan2.2 layout: residual blocks, patch 2, 16x spatial / 4x temporal), CPU, random weights.
Oracles: `decode_streaming` == `vae.decode(z).sample` and `encode_streaming` == `vae.encode(x).latent_dist.mode()`
for 1, 2, 3, 4 latent frames (1, 5, 9, 13 pixel frames) at two sizes; the build's own VAE stages
(`mc_export.components.wan_vae`, exported by `export_component` as a bundle ships them) driven by a numpy loop
over ONNX Runtime == the torch loop, at two sizes from one pair of files.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import AutoencoderKLWan

from metacanvas_deploy.mc_export.components.ranges import BuildRanges
from metacanvas_deploy.mc_export.components.wan_vae import wan_vae_stages
from metacanvas_deploy.mc_export.errors import ConfigError, ExportError, InputError
from metacanvas_deploy.mc_export.export.onnx_export import check_graph, export_component
from metacanvas_deploy.mc_export.export.wan_vae_stream import (
    PAST,
    PRESENT,
    WanStreamingDecoder,
    WanStreamingEncoder,
    cache_layout,
    cache_specs,
    decode_streaming,
    encode_streaming,
)
from metacanvas_deploy.mc_export.models.metacanvas import MetaCanvas

LATENT_FRAMES = (1, 2, 3, 4)  # -> 1, 5, 9, 13 pixel frames
SIZES = ((32, 32), (48, 80))  # pixels: 2x2 and 3x5 latent grids
# Streaming runs upstream's own modules on the same chunks; the only reassociation is the 1x1x1 post_quant_conv
# (quant_conv when encoding), which upstream applies to all frames at once and we per chunk: oneDNN blocks a
# (T, h, w) conv differently, 1 ulp (1.2e-7) apart, which the decoder's ~30 layers carry to ~1.4e-6 seen.
# 1e-5 on outputs of magnitude ~1 leaves room; a wrong cache frame or chunk boundary moves them by O(1e-1).
TORCH_ATOL = 1e-5
# ORT vs torch: other conv / reduction kernels (summation order), ~1e-6 relative per layer, over ~30 layers
# and 4 chunks of recurrence through the caches; 1e-4 is > 10x the max seen.
ONNX_ATOL = 1e-4
# The build's stages take batch 1 and a latent grid of (2 h_tok, 2 w_tok) (Wan's DiT patch is 2): token grids
# 2x2 to 3x3, exported at opt 2x3 (unequal, so a swapped axis cannot pass), run at 2x3 and 3x2.
RANGES = BuildRanges(height=(64, 64, 96), width=(64, 96, 96), num_frames=(1, 9, 9), prompt_tokens=(1, 8, 8))
ONNX_SIZES = ((64, 96), (96, 64))


@pytest.fixture(scope="module")
def model() -> MetaCanvas:
    return MetaCanvas.from_preset("wan", "tiny")


@pytest.fixture(scope="module")
def vae(model) -> AutoencoderKLWan:
    return model.vae.eval()


@pytest.fixture(scope="module")
def decoder(vae) -> WanStreamingDecoder:
    return WanStreamingDecoder(vae).eval()


@pytest.fixture(scope="module")
def encoder(vae) -> WanStreamingEncoder:
    return WanStreamingEncoder(vae).eval()


def latents(batch: int, frames: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, frames, height // 16, width // 16, generator=g)


def video(batch: int, frames: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1


# ---- layout ---------------------------------------------------------------------------------------------------

def test_cache_layout_is_bounded_and_matches_every_chunk(vae, decoder, encoder):
    """Every chunk's caches have exactly the spec's shapes (so memory does not grow with the video), <= 2 frames."""
    dec_specs = cache_specs(vae, 48, 80, batch=2, part="decoder")
    enc_specs = cache_specs(vae, 48, 80, batch=2, part="encoder")
    assert (len(dec_specs), len(enc_specs)) == (24, 16)  # causal convs that read history (1x1x1 shortcuts do not)
    assert [s.input_name for s in decoder.slots] == [s.name for s in dec_specs]
    assert all(s.shape[2] <= 2 for s in dec_specs + enc_specs)
    assert dec_specs[0] == (PAST + "conv_in", (2, 8, 2, 3, 5))
    assert ("past.down_blocks.1.downsampler.time_conv", (2, 16, 1, 6, 10)) in enc_specs
    with torch.no_grad():
        z, x = latents(2, 4, 48, 80), video(2, 13, 48, 80)
        caches = ()
        for i in range(z.shape[2]):
            _, *caches = decoder(z[:, :, i:i + 1], *caches)
            assert [tuple(c.shape) for c in caches] == [s.shape for s in dec_specs]
        caches = ()
        for chunk in (x[:, :, :1], x[:, :, 1:5], x[:, :, 5:9], x[:, :, 9:13]):
            _, *caches = encoder(chunk, *caches)
            assert [tuple(c.shape) for c in caches] == [s.shape for s in enc_specs]
    assert decoder.output_names()[1:] == [PRESENT + s.name for s in decoder.slots]


# ---- torch oracle ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_streaming_matches_diffusers(vae, decoder, size):
    z = latents(1, max(LATENT_FRAMES), *size)
    with torch.no_grad():
        for frames in LATENT_FRAMES:
            ref = vae.decode(z[:, :, :frames]).sample  # (1, 3, 1 + 4 (frames - 1), H, W)
            ours = decode_streaming(decoder, z[:, :, :frames])
            assert ours.shape == ref.shape == (1, 3, 1 + 4 * (frames - 1), *size)
            assert (ours - ref).abs().max().item() <= TORCH_ATOL, frames


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_encode_streaming_matches_diffusers(vae, encoder, size):
    x = video(1, 1 + 4 * (max(LATENT_FRAMES) - 1), *size)
    with torch.no_grad():
        for frames in LATENT_FRAMES:
            clip = x[:, :, :1 + 4 * (frames - 1)]
            ref = vae.encode(clip).latent_dist.mode()  # (1, 8, frames, H/16, W/16)
            ours = encode_streaming(encoder, clip)
            assert ours.shape == ref.shape == (1, 8, frames, size[0] // 16, size[1] // 16)
            assert (ours - ref).abs().max().item() <= TORCH_ATOL, frames


def test_wan21_layout_matches_diffusers():
    """The non-residual Wan 2.1 layout (no patchify, 8x spatial, `WanUpBlock`) streams through the same code."""
    torch.manual_seed(0)
    vae21 = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        dec = decode_streaming(WanStreamingDecoder(vae21), z)
        enc = encode_streaming(WanStreamingEncoder(vae21), x)
        assert (dec - vae21.decode(z).sample).abs().max().item() <= TORCH_ATOL
        assert (enc - vae21.encode(x).latent_dist.mode()).abs().max().item() <= TORCH_ATOL


# ---- errors ---------------------------------------------------------------------------------------------------

def test_errors(vae, decoder, encoder):
    with pytest.raises(InputError, match="1 \\+ 4k"):
        encode_streaming(encoder, video(1, 6, 32, 32))
    with pytest.raises(InputError, match="later chunk must be"):
        _, *caches = encoder(video(1, 1, 32, 32))
        encoder(video(1, 1, 32, 32), *caches)
    with pytest.raises(InputError, match="multiples of 16"):
        encoder(video(1, 1, 40, 32))
    with pytest.raises(InputError, match="decoder chunk must be"):
        decoder(latents(1, 2, 32, 32))
    _, *caches = decoder(latents(1, 1, 32, 32))
    with pytest.raises(InputError, match="needs more than the 23 caches"):
        decoder(latents(1, 1, 32, 32), *caches[:-1])
    with pytest.raises(InputError, match="expected 24 caches, got 25"):
        decoder(latents(1, 1, 32, 32), *caches, caches[0])
    with pytest.raises(InputError, match="multiples of 16"):
        cache_specs(vae, 40, 32)
    with pytest.raises(ConfigError, match="part must be"):
        cache_layout(vae, "middle")
    with pytest.raises(ConfigError, match="temporal compression"):
        WanStreamingDecoder(AutoencoderKLWan(base_dim=8, z_dim=4, temperal_downsample=[False, False, True]))
    with pytest.raises(ConfigError, match="call .eval()"):  # dropout is left out of the chunk
        WanStreamingDecoder(AutoencoderKLWan(base_dim=8, z_dim=4, dropout=0.1)).train()(torch.zeros(1, 4, 1, 2, 2))


def test_double_tensors_are_refused(tmp_path):
    """The TensorRT gate of every export (`check_graph`): a float64 Cast and its output are reported by name."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [2])
    cast = onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.DOUBLE, name="to_double")
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([cast], "g", [x], [y])), str(tmp_path / "g.onnx"))
    with pytest.raises(ExportError, match=r"DOUBLE tensors \['y', 'to_double'\]"):
        check_graph(tmp_path / "g.onnx")


# ---- ONNX: the build's stages -----------------------------------------------------------------------------------

def ort_stream(first: ort.InferenceSession, rest: ort.InferenceSession, chunks: list[np.ndarray]) -> np.ndarray:
    """The runtime's loop: chunk 0 through `first`, then `rest`, each call's `present.*` fed back as `past.*`."""
    chunk_name = first.get_inputs()[0].name
    names = [o.name for o in first.get_outputs()]
    out, *caches = first.run(None, {chunk_name: chunks[0]})
    results = [out]
    for chunk in chunks[1:]:
        feed = {PAST + n[len(PRESENT):]: c for n, c in zip(names[1:], caches)}
        out, *caches = rest.run(None, {chunk_name: chunk, **feed})
        results.append(out)
    return np.concatenate(results, axis=2)


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def exported_pair(model, part: str, root) -> dict:
    """The build's `vae_<part>_first` and `vae_<part>` stages, exported as a build exports them."""
    stages = wan_vae_stages(model, RANGES, encoder=part == "encoder")
    paths = {}
    for kind, stage in (("first", f"vae_{part}_first"), ("rest", f"vae_{part}")):
        paths[kind] = root / f"{stage}.onnx"
        export_component(stages[stage], paths[kind])
    return {**paths, "module": stages[f"vae_{part}"].module()}


@pytest.fixture(scope="module")
def decoder_onnx(model, tmp_path_factory) -> dict:
    return exported_pair(model, "decoder", tmp_path_factory.mktemp("wan_vae_stream"))


def test_decoder_onnx_graph(decoder_onnx):
    """One chunk per file: names from the module, a symbolic grid, weights stored once."""
    decoder = decoder_onnx["module"]
    for kind in ("first", "rest"):
        model = onnx.load(str(decoder_onnx[kind]))
        inputs = [i.name for i in model.graph.input]
        assert inputs == decoder.input_names(first=kind == "first")
        assert [o.name for o in model.graph.output] == decoder.output_names()
        dims = model.graph.input[0].type.tensor_type.shape.dim  # latents (1, C, 1, h, w)
        assert [d.dim_value for d in dims[:3]] == [1, 8, 1] and all(d.dim_param for d in (dims[3], dims[4]))
        weight_bytes = sum(p.numel() * 4 for p in decoder.parameters())
        init_bytes = sum(len(t.raw_data) or 4 * np.prod(t.dims) for t in model.graph.initializer)
        assert init_bytes < 1.2 * weight_bytes  # no per-frame copies: the file does not depend on the frame count


@pytest.mark.parametrize("size", ONNX_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decoder_onnx_loop_matches_torch(vae, decoder_onnx, size):
    decoder = decoder_onnx["module"]
    first, rest = session(decoder_onnx["first"]), session(decoder_onnx["rest"])
    z = latents(1, max(LATENT_FRAMES), *size, seed=5)
    for frames in LATENT_FRAMES:  # the same two files for every length
        ref = decode_streaming(decoder, z[:, :, :frames]).numpy()
        ours = ort_stream(first, rest, [z[:, :, i:i + 1].numpy() for i in range(frames)])
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= ONNX_ATOL, frames
    with torch.no_grad():  # and the loop as a whole against diffusers' own decode
        assert np.abs(ours - vae.decode(z).sample.numpy()).max() <= ONNX_ATOL + TORCH_ATOL


@pytest.mark.slow
def test_encoder_onnx_loop_matches_torch(vae, model, tmp_path_factory):
    paths = exported_pair(model, "encoder", tmp_path_factory.mktemp("wan_vae_stream_enc"))
    encoder = paths["module"]
    first, rest = session(paths["first"]), session(paths["rest"])
    for graph in (onnx.load(str(paths[k])) for k in ("first", "rest")):
        dims = graph.graph.output[0].type.tensor_type.shape.dim  # latents (1, C, 1, h, w): a symbolic grid
        assert all(d.dim_param for d in dims[3:])
    for size in ONNX_SIZES:
        x = video(1, 13, *size, seed=6)
        ref = encode_streaming(encoder, x).numpy()
        chunks = [x[:, :, :1].numpy()] + [x[:, :, s:s + 4].numpy() for s in (1, 5, 9)]
        ours = ort_stream(first, rest, chunks)
        assert np.abs(ours - ref).max() <= ONNX_ATOL
        with torch.no_grad():
            assert np.abs(ours - vae.encode(x).latent_dist.mode().numpy()).max() <= ONNX_ATOL + TORCH_ATOL
