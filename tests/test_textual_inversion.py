"""Textual-inversion embeddings: the layouts people share, parity with diffusers' load_textual_inversion,
the command line, and one clear error for every file that is not one."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from minildm import convert
from test_convert import _RunsCode
from test_ldm import load_original, models, original_file, reference_pipeline  # noqa: F401
from test_sample import cli_error, run, workdir  # noqa: F401

WIDTH = 32  # the tiny text encoder's width


def write_embedding(path, layout, vectors, token="<cat-toy>"):
    """An embedding file in one of the shared layouts."""
    if layout == "diffusers":
        torch.save({token: vectors if len(vectors) > 1 else vectors[0]}, path)
    elif layout == "diffusers-safetensors":
        save_file({token: vectors.contiguous()}, str(path))
    elif layout == "a1111":  # what the A1111 web UI's training writes
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                    "name": token, "step": 3000, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    elif layout == "a1111-safetensors":
        save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


CASES = [("diffusers", 1, "emb.bin"), ("diffusers-safetensors", 3, "emb.safetensors"), ("a1111", 2, "emb.pt"),
         ("a1111-safetensors", 2, "cat-toy.safetensors")]


@pytest.mark.parametrize("layout, count, name", CASES, ids=[c[0] for c in CASES])
def test_prompts_match_diffusers_load_textual_inversion(models, original_file, tmp_path, layout, count, name):
    """After loading the same file, a prompt with the token gives the same token ids and the same context as
    diffusers' StableDiffusionPipeline.load_textual_inversion (multi-vector tokens included). An A1111
    .safetensors file holds its vectors alone (`emb_params`) and names no token: minildm uses the file's
    name, and diffusers is given that name as its `token`."""
    vectors = torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(count))
    path = write_embedding(tmp_path / name, layout, vectors)
    ours = load_original(original_file)
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path)
    before = ours.encode_prompt("a photo of a cat")
    token = ours.load_textual_inversion(path)
    assert token == ("cat-toy" if layout == "a1111-safetensors" else "<cat-toy>")
    pipe.load_textual_inversion(str(path), token=token if layout == "a1111-safetensors" else None)
    for prompt in (f"a photo of {token} on a beach", token, f"two {token}s and a dog"):
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.tokenizer(prompt)[0].tolist() == ids, prompt
        with torch.no_grad():
            reference = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        torch.testing.assert_close(ours.encode_prompt(prompt), reference, atol=1e-5, rtol=0)
    assert ours.tokenizer.decode(ours.tokenizer(f"a {token} toy")[0]) == "a " + " ".join(
        [token] + [f"{token}_{i}" for i in range(1, count)]) + " toy"
    # prompts without the token are untouched
    torch.testing.assert_close(ours.encode_prompt("a photo of a cat"), before, atol=0, rtol=0)


def test_token_can_be_renamed_and_a1111_safetensors_use_the_file_name(original_file, tmp_path):
    """A file that names no token is loaded under its file name; any file under the token asked for."""
    model = load_original(original_file)
    vectors = torch.randn(2, WIDTH)
    path = write_embedding(tmp_path / "watercolour-style.safetensors", "a1111-safetensors", vectors)
    assert model.load_textual_inversion(path) == "watercolour-style"
    assert model.tokenizer("watercolour-style")[0, 1:3].tolist() == list(range(49408, 49410))
    other = write_embedding(tmp_path / "other.bin", "diffusers", torch.randn(1, WIDTH))
    assert model.load_textual_inversion(other, "<mine>") == "<mine>"
    assert model.text_encoder.embeddings.token_embedding.weight.shape == (49411, WIDTH)
    torch.testing.assert_close(model.text_encoder.embeddings.token_embedding.weight[49408:49410], vectors)


def test_bad_embedding_files_are_one_line_errors(original_file, tmp_path):
    """Wrong width, a token already known, a full checkpoint, and a pickle that runs code."""
    model = load_original(original_file)
    wide = write_embedding(tmp_path / "sd2.pt", "a1111", torch.randn(1, 1024))
    with pytest.raises(convert.CheckpointError, match="1024-wide vectors .SD 2.x's OpenCLIP.*32 wide"):
        model.load_textual_inversion(wide)
    ok = write_embedding(tmp_path / "ok.bin", "diffusers", torch.randn(1, WIDTH))
    model.load_textual_inversion(ok)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        model.load_textual_inversion(ok)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        model.load_textual_inversion(ok, "cat")
    with pytest.raises(convert.CheckpointError, match=r"not a textual-inversion embedding .*: it is a LoRA"):
        lora = tmp_path / "lora.safetensors"
        save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4), "x.alpha": torch.ones(())},
                  str(lora))
        model.load_textual_inversion(lora)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"<evil>": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(convert.CheckpointError, match="refusing to load .*system"):
        model.load_textual_inversion(evil)
    assert not marker.exists()


def test_command_line_embedding(workdir, monkeypatch):  # noqa: F811
    """--embedding FILE:TOKEN lets the prompt use TOKEN; a file that is not one is a one-line error."""
    write_embedding(workdir / "style.bin", "diffusers", torch.randn(2, WIDTH))
    result = run(workdir, "a <my-style> cat", "--steps", "2", "--seed", "1", "--out", "ti",
                 "--embedding", "style.bin:<my-style>")
    assert result.returncode == 0, result.stderr
    assert "write <my-style> in the prompt" in result.stderr
    assert (workdir / "ti" / "a-my-style-cat-1.png").exists()
    message = cli_error(workdir, monkeypatch, "a cat", "--embedding", "notes.png")
    assert message.startswith("--embedding notes.png:") and "a text file" in message
    message = cli_error(workdir, monkeypatch, "a cat", "--embedding", "missing.pt")
    assert "missing.pt" in message
