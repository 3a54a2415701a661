"""Importing apple/ml-tarflow checkpoints: the imported forward flow computes what the reference computes.

The reference (`transformer_flow.py` of github.com/apple/ml-tarflow) is imported from $ML_TARFLOW or
../shared/reference/ml-tarflow next to this repository, and these tests skip, saying so, where it is absent.
Each reference Model has random weights with re-drawn output projections (ml-tarflow zero-initialises them, which
would make every block the identity and every comparison vacuous); its state dict is saved to a file, imported
with `import_tarflow`, and the biflow checkpoint is loaded back with `load_checkpoint`.

Log-determinants: ml-tarflow averages each block's log|det| over the T*D token dimensions, biflow sums it, so
ours equals the reference's times C*H*W (`tarflow_logdet` divides it back).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from biflow.checkpoint import load_checkpoint, read_checkpoint
from biflow.cli import main
from biflow.errors import CheckpointError
from biflow.importers import import_tarflow, tarflow_logdet

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("ML_TARFLOW", ROOT.parent / "shared" / "reference" / "ml-tarflow"))
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# name: (in_channels, image_size, patch_size, width, num_blocks, layers_per_block, num_classes)
GEOMETRIES = {
    "cond-2-blocks-1-layer": (1, 8, 2, 64, 2, 1, 10),
    "uncond-3-blocks-2-layers": (3, 8, 2, 128, 3, 2, 0),
    "cond-3-blocks-2-layers-patch-1": (1, 4, 1, 128, 3, 2, 4),
    "uncond-4-blocks-1-layer-patch-4": (3, 8, 4, 64, 4, 1, 0),
}
CONDITIONAL = [name for name, g in GEOMETRIES.items() if g[-1]]


@pytest.fixture(scope="module")
def tf():
    """The reference module, or a skip that says where it was looked for."""
    if not (REFERENCE_DIR / "transformer_flow.py").is_file():
        pytest.skip(f"ml-tarflow reference not found at {REFERENCE_DIR} (set ML_TARFLOW to a clone of apple/ml-tarflow)")
    sys.path.insert(0, str(REFERENCE_DIR))
    try:
        return importlib.import_module("transformer_flow")
    finally:
        sys.path.remove(str(REFERENCE_DIR))


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one torch thread (conftest)


def reference_model(tf, name: str, seed: int = 0, **kw):
    """A reference Model of geometry `name`: its own random init, then random output projections."""
    channels, size, patch, width, blocks, layers, classes = GEOMETRIES[name]
    torch.manual_seed(seed)
    model = tf.Model(channels, size, patch, width, blocks, layers, num_classes=classes, **kw)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
        torch.nn.init.normal_(block.proj_out.bias, std=0.02)
        if block.class_embed is not None:  # classes that differ enough for guidance to matter
            torch.nn.init.normal_(block.class_embed, std=0.5)
    return model.eval()


def imported(tf, name: str, tmp_path: Path, payload=None):
    """(reference Model, the biflow flow imported from its saved state dict)."""
    model = reference_model(tf, name)
    src, out = tmp_path / "tarflow.pth", tmp_path / "forward.pt"
    torch.save(model.state_dict() if payload is None else payload(model.state_dict()), src)
    import_tarflow(src, out)
    return model, load_checkpoint(out)


def in_dtype(model, flow, dtype, monkeypatch):
    """Both models in `dtype`. In float64 the reference's float32 casts (`x.float()` before each LayerNorm and
    exp) become float64 casts for the test's duration, so the reference computes in float64 throughout."""
    if dtype == torch.float64:
        monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)
    return model.to(dtype), flow.to(dtype)


def inputs(name: str, dtype, n: int = 5):
    channels, size, _, _, _, _, classes = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64).to(dtype)
    return x, (torch.arange(n) % classes if classes else None)


def latents(model, name: str, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z = the reference's encoding of `inputs` (image-shaped), and the labels: a z the flow decodes without blowing
    up (ml-tarflow has no norm control, and a random z can drive exp(a) to overflow within a few tokens)."""
    x, y = inputs(name, dtype)
    with torch.no_grad():
        return model.unpatchify(model(x, y)[0]), y


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """max |ours - ref| <= tol * max |ref| (relative to the tensor's scale)."""
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


# ================================================================ forward direction
@DTYPES
@pytest.mark.parametrize("name", GEOMETRIES)
def test_z_and_log_det_equal_the_reference(tf, name, dtype, tmp_path, monkeypatch):
    """z (image-shaped) equals the reference's z tokens folded into an image; our per-sample log|det| (a sum) equals
    the reference's summed per-block means times C*H*W. With labels, and with none (the null label = class mean)."""
    model, flow = in_dtype(*imported(tf, name, tmp_path), dtype, monkeypatch)
    x, y = inputs(name, dtype)
    for labels in ([y, None] if y is not None else [None]):
        with torch.no_grad():
            z_ref, _, logdet_ref = model(x.clone(), labels)
            z, _, logdet = flow(x, labels)
        assert z.shape == x.shape
        assert_rel(z, model.unpatchify(z_ref), TOL[dtype])
        assert_rel(logdet, logdet_ref * flow.dims, TOL[dtype])
        assert_rel(tarflow_logdet(logdet, flow), logdet_ref, TOL[dtype])


# ================================================================ inverse direction
@DTYPES
@pytest.mark.parametrize("name", GEOMETRIES)
def test_the_exact_inverse_equals_the_reference(tf, name, dtype, tmp_path, monkeypatch):
    """Unguided decoding of the same z gives the reference's x (and ours leaves z untouched)."""
    model, flow = in_dtype(*imported(tf, name, tmp_path), dtype, monkeypatch)
    z, y = latents(model, name, dtype)
    kept = z.clone()
    with torch.no_grad():
        x_ref = model.reverse(model.patchify(z), y)
        x = flow.inverse(z, y)
    assert torch.equal(z, kept)
    assert_rel(x, x_ref, TOL[dtype])
    assert_rel(x, inputs(name, dtype)[0], 1e2 * TOL[dtype])  # and both invert the forward pass


@DTYPES
@pytest.mark.parametrize("guidance", [0.5, 2.0])
@pytest.mark.parametrize("name", CONDITIONAL)
def test_the_guided_inverse_equals_the_reference_with_annealed_guidance_on_a_and_b(tf, name, guidance, dtype, tmp_path,
                                                                                   monkeypatch):
    """Guidance: the reference's annealed guidance on both the log-scale a and the shift b (guide_what='ab', the
    null pass on the mean class embedding) is ours; checked on the whole flow and block by block."""
    model, flow = in_dtype(*imported(tf, name, tmp_path), dtype, monkeypatch)
    z, y = latents(model, name, dtype)
    with torch.no_grad():
        x_ref = model.reverse(model.patchify(z), y, guidance=guidance, guide_what="ab", annealed_guidance=True)
        x = flow.inverse(z, y, guidance=guidance)
        unguided = flow.inverse(z, y)
    assert_rel(x, x_ref, TOL[dtype])
    assert (x - unguided).abs().max() > 100 * TOL[dtype] * x.abs().max()  # guidance changed the result
    null = flow.labels(None, len(y), z.device)
    tokens = flow.to_tokens(z)
    for block, ref_block in zip(flow.blocks, model.blocks):
        handed = tokens.clone()  # MetaBlock.reverse writes its result into the tensor it is given
        with torch.no_grad():
            ref = ref_block.reverse(handed, y, guidance, "ab", annealed_guidance=True)
            ours = block.inverse(tokens, y, null, guidance)
        if not block.flip:  # in raster order it decodes in place: the comparison is with its return value
            assert not torch.equal(handed, tokens)
        assert_rel(ours, ref, TOL[dtype])


# ================================================================ checkpoint formats
@pytest.mark.parametrize("wrap", ["plain", "training-state", "ddp-prefix", "nested-ddp-compile"])
def test_a_training_state_and_ddp_or_compile_prefixes_import_the_same_weights(tf, wrap, tmp_path):
    """{"model": state, "optimizer": ...} nesting and `module.` / `_orig_mod.` prefixes are unwrapped."""
    payloads = {
        "plain": None,
        "training-state": lambda s: {"model": s, "optimizer": {"state": {}}, "step": torch.tensor(7)},
        "ddp-prefix": lambda s: {f"module.{k}": v for k, v in s.items()},
        "nested-ddp-compile": lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}, "epoch": 3},
    }
    model, flow = imported(tf, "cond-2-blocks-1-layer", tmp_path, payloads[wrap])
    x, y = inputs("cond-2-blocks-1-layer", torch.float32)
    with torch.no_grad():
        assert_rel(flow(x, y)[0], model.unpatchify(model(x.clone(), y)[0]), TOL[torch.float32])


def test_the_imported_checkpoint_records_its_source_and_architecture_switches(tf, tmp_path):
    """The biflow checkpoint names the source file and its hash, and the config expresses ml-tarflow's choices."""
    _, flow = imported(tf, "cond-2-blocks-1-layer", tmp_path)
    ckpt = read_checkpoint(tmp_path / "forward.pt")
    assert ckpt["kind"] == "forward" and ckpt["imported"]["from"] == "apple/ml-tarflow"
    assert len(ckpt["imported"]["sha256"]) == 64
    cfg = flow.cfg
    assert (cfg.final_norm, cfg.gelu, cfg.null_label, cfg.clip) == (False, "exact", "mean", None)
    assert (cfg.width // cfg.heads, cfg.num_blocks, cfg.layers_per_block, cfg.num_classes) == (64, 2, 1, 10)
    assert (cfg.in_channels, cfg.image_size, cfg.patch_size) == (1, 8, 2)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_imports_a_checkpoint_that_biflow_sample_then_uses(tf, tmp_path, capsys):
    """`biflow import-tarflow` writes forward.pt; `biflow sample --sampler exact` draws from it."""
    torch.save(reference_model(tf, "uncond-3-blocks-2-layers").state_dict(), tmp_path / "t.pth")
    code, out, err = cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "f.pt"),
                         "--image-size", "8", "--noise-std", "0.1")
    assert code == 0, err
    assert "3 blocks x 2 layers" in out and "C*H*W" in out
    assert load_checkpoint(tmp_path / "f.pt").cfg.noise_std == 0.1
    code, out, err = cli(capsys, "sample", str(tmp_path / "f.pt"), "--sampler", "exact", "--num", "3", "--no-denoise",
                         "--out", str(tmp_path / "s.npz"))
    assert code == 0, err


# ================================================================ what does not import
def _bad(tf, what: str) -> dict:
    state = reference_model(tf, "cond-2-blocks-1-layer").state_dict()
    if what == "wrong-shape":
        state["blocks.1.attn_blocks.0.mlp.main.0.weight"] = torch.zeros(128, 64)
    elif what == "missing-key":
        del state["blocks.1.proj_out.bias"]
    elif what == "unexpected-key":
        state["blocks.0.final_norm.weight"] = torch.ones(64)
    elif what == "learned-prior":
        state["var"] = state["var"] * 1.5
    elif what == "non-nvp":
        state = reference_model(tf, "cond-2-blocks-1-layer", nvp=False).state_dict()
    elif what == "not-a-state-dict":
        state = {"model": "weights", "step": 3}
    return state


BAD = {"wrong-shape": "blocks.1.attn_blocks.0.mlp.main.0.weight has shape (128, 64), expected (256, 64)",
       "missing-key": "missing key blocks.1.proj_out.bias", "unexpected-key": "unexpected key blocks.0.final_norm.weight",
       "learned-prior": "prior variance `var` is not all ones", "non-nvp": "a non-nvp (volume-preserving) model",
       "not-a-state-dict": "not an ml-tarflow Model state dict"}


@pytest.mark.parametrize("what", BAD)
def test_unsupported_checkpoints_are_one_line_errors_naming_what_differs(tf, what, tmp_path, capsys):
    """Through the API a CheckpointError, through the CLI one line on stderr and exit code 2; no output file."""
    torch.save(_bad(tf, what), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=BAD[what].replace("(", r"\(").replace(")", r"\)")):
        import_tarflow(tmp_path / "bad.pth", tmp_path / "f.pt")
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "f.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and BAD[what] in err
    assert not (tmp_path / "f.pt").exists()


def test_a_token_dimension_that_does_not_say_the_patch_size_needs_a_hint(tf, tmp_path, capsys):
    """D = 8 is neither 1 x p^2 nor 3 x p^2: the import asks for --patch-size or --in-channels, and takes either."""
    torch.manual_seed(0)
    torch.save(tf.Model(2, 8, 2, 64, 2, 1).state_dict(), tmp_path / "t.pth")
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "f.pt"))
    assert code == 2 and "give --patch-size" in err
    for hint in (["--patch-size", "2"], ["--in-channels", "2"]):
        assert cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "f.pt"), *hint)[0] == 0
        assert load_checkpoint(tmp_path / "f.pt").image_shape() == (2, 8, 8)
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "f.pt"),
                       "--patch-size", "2", "--image-size", "16")
    assert code == 2 and "make 8px images, not 16" in err


def test_a_biflow_checkpoint_or_a_missing_file_is_refused(tmp_path, capsys):
    """Importing something that is already a biflow checkpoint, or nothing, is a one-line error."""
    from biflow.checkpoint import FORMAT
    from biflow.models import ForwardFlow

    flow = ForwardFlow("tiny")
    torch.save({"format": FORMAT, "kind": "forward", "config": flow.cfg.model_dump(), "model": flow.state_dict()},
               tmp_path / "ours.pt")
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "ours.pt"), "--out", str(tmp_path / "f.pt"))
    assert code == 2 and "already a biflow checkpoint" in err
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "none.pth"), "--out", str(tmp_path / "f.pt"))
    assert code == 2 and "checkpoint not found" in err


# ================================================================ the switches themselves
def test_the_forward_flow_switches_default_to_the_original_architecture_and_change_only_what_they_name():
    """Defaults: a LayerNorm before each output projection, tanh GELU, a learned null-label row. Switched: no final
    norm, exact GELU, and the null label's embedding is the mean of the class rows (no extra row)."""
    import torch.nn.functional as F

    from biflow.models import ForwardFlow

    default = ForwardFlow("tiny")
    assert "blocks.0.norm.weight" in default.state_dict() and default.blocks[0].class_emb.num_embeddings == 11
    torch.manual_seed(0)
    switched = ForwardFlow("tiny", final_norm=False, gelu="exact", null_label="mean")
    block = switched.blocks[0]
    assert "blocks.0.norm.weight" not in switched.state_dict() and block.class_emb.num_embeddings == 10
    assert torch.equal(block.class_rows()[10], block.class_emb.weight.mean(0))
    h = torch.randn(2, 3, 32)
    mlp = block.layers[0].mlp
    assert torch.equal(mlp(h), mlp.fc2(F.gelu(mlp.fc1(h))))
    tanh = default.blocks[0].layers[0].mlp
    assert torch.equal(tanh(h), tanh.fc2(F.gelu(tanh.fc1(h), approximate="tanh")))


def test_biflow_train_stage_2_runs_on_an_imported_flow_that_records_its_data(tf, tmp_path, capsys):
    """`--data DIR` records the prepared digits the flow models, and `biflow train --stage reverse --forward` trains
    G against the import; an import that records no data is a one-line error there, as is data of another shape."""
    from biflow.config import DataConfig
    from biflow.data import prepare

    data = prepare(DataConfig(name="digits"), tmp_path / "data")
    torch.save(reference_model(tf, "cond-2-blocks-1-layer").state_dict(), tmp_path / "t.pth")
    assert cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "f.pt"), "--data", str(data))[0] == 0
    assert read_checkpoint(tmp_path / "f.pt")["data_dir"] == str(data.resolve())
    code, out, err = cli(capsys, "train", "--stage", "reverse", "--forward", str(tmp_path / "f.pt"), "--out", str(tmp_path / "run"),
                         "--no-progress", "--set", "reverse.size=tiny", "--set", "train_reverse.steps=2",
                         "--set", "train_reverse.batch_size=8")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run" / "reverse.pt").cfg.num_blocks == 2
    assert cli(capsys, "import-tarflow", str(tmp_path / "t.pth"), "--out", str(tmp_path / "g.pt"))[0] == 0
    code, _, err = cli(capsys, "train", "--stage", "reverse", "--forward", str(tmp_path / "g.pt"), "--out", str(tmp_path / "r2"))
    assert code == 2 and "records no training data" in err and len(err.strip().splitlines()) == 1
    torch.save(reference_model(tf, "uncond-3-blocks-2-layers").state_dict(), tmp_path / "rgb.pth")
    code, _, err = cli(capsys, "import-tarflow", str(tmp_path / "rgb.pth"), "--out", str(tmp_path / "h.pt"), "--data", str(data))
    assert code == 2 and "the flow models 3x8x8 images, the data has 1x8x8" in err
