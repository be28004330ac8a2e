"""The command line, driven in subprocesses: exit codes, JSON, progress on a terminal only."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from asyncweights._cli import build_parser, parse_size
from asyncweights.testing import StoreBuilder, random_weights

from .cli_support import cli, ok_json, run_on_pty

SHAPES = {
    "text_encoder/model.layers.0.mlp.up_proj.weight": (128, 64),
    "text_encoder/model.norm.weight": (64,),
    "transformer/blocks.0.attn.to_q.weight": (64, 128),
    "vae/decoder.conv_in.weight": (8, 4, 3, 3),
}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    b = StoreBuilder(root)
    b.add_model("toy:latest", random_weights(SHAPES), era="E1")
    b.add_model("toy:int4", random_weights(SHAPES), era="E1", quantize="int4")
    return root


def test_ls_lists_models(store: Path, tmp_path: Path) -> None:
    data = ok_json(cli("ls", "--store", str(store), "--json", tmp=tmp_path))
    rows = {m["name"]: m for m in data["models"]}
    assert sorted(rows) == ["toy:int4", "toy:latest"]
    assert rows["toy:latest"]["tensors"] == 4
    assert rows["toy:latest"]["quantization"] is None
    assert rows["toy:int4"]["quantization"] == "int4"
    assert rows["toy:int4"]["components"] == ["text_encoder", "transformer", "vae"]
    text = cli("ls", "--store", str(store), tmp=tmp_path)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == [
        "NAME", "ID", "SIZE", "MODIFIED", "KIND", "FORMAT", "STORED", "DETAILS"
    ]  # fmt: skip


def test_ls_of_an_empty_or_missing_store_names_the_store(tmp_path: Path) -> None:
    # The default store of a machine without Ollama does not exist: an empty table alone
    # did not say which store was looked at.
    home = tmp_path / "home"
    home.mkdir()
    missing = cli("ls", tmp=tmp_path, env={"HOME": str(home)})
    assert (missing.returncode, missing.stderr) == (0, "")
    root = home / ".ollama" / "models"
    assert missing.stdout == f"no models in store '{root}' (no such directory)\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    listed = cli("ls", "--store", str(empty), tmp=tmp_path)
    assert (listed.returncode, listed.stdout) == (0, f"no models in store '{empty}'\n")
    assert ok_json(cli("ls", "--store", str(empty), "--json", tmp=tmp_path)) == {
        "store": str(empty),
        "models": [],
    }


def test_demo_help_says_where_the_demo_store_is(tmp_path: Path) -> None:
    text = " ".join(cli("demo", "--help", tmp=tmp_path).stdout.split())
    assert "--store DIR where to write and load the demo models (default: a store under the" \
        " user cache directory, $XDG_CACHE_HOME/asyncweights/demo or" \
        " ~/.cache/asyncweights/demo)" in text  # fmt: skip
    assert "~/.ollama/models" not in text
    ls = " ".join(cli("ls", "--help", tmp=tmp_path).stdout.split())
    assert "--store DIR models root (default: $OLLAMA_MODELS or ~/.ollama/models)" in ls


def test_show_reports_quantization_parameters_and_dtypes(store: Path, tmp_path: Path) -> None:
    data = ok_json(cli("show", "toy:int4", "--store", str(store), "--json", tmp=tmp_path))
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    assert data["parameters"] == params
    assert data["model_index"]["parameter_count"] == params
    per = data["per_component"]
    assert per["text_encoder"]["quantization"] == {"int4 (affine, 4-bit, group 64)": 1}
    assert per["transformer"]["quantization"] == {"int4 (affine, 4-bit, group 64)": 1}
    assert per["vae"]["quantization"] == {}
    assert data["dtypes"]["U32"]["tensors"] == 2
    assert sorted(data["dtypes"]) == ["BF16", "U32"]
    assert data["dtypes"]["BF16"]["tensors"] == 6  # norm, vae, two scales, two biases
    assert "model_index.json" in data["configs"]


def test_load_prints_summary_and_converts(store: Path, tmp_path: Path) -> None:
    args = ("load", "toy:latest", "--store", str(store), "--json")
    data = ok_json(cli(*args, tmp=tmp_path))
    assert data["tensors"] == 4
    assert data["bytes"] == sum(int(np.prod(s)) * 2 for s in SHAPES.values())
    assert data["gb_per_s"] > 0
    assert data["mlx_peak_bytes"] > 0
    assert data["max_rss_bytes"] > 0
    data = ok_json(cli(*args, "-c", "vae", "--dtype", "f32", "--verify", tmp=tmp_path))
    assert data["tensors"] == 1
    assert data["per_component"]["vae"]["dtypes"] == {"float32": 1}
    assert data["verified"] is True
    text = cli("load", "toy:int4", "--store", str(store), tmp=tmp_path)
    assert text.returncode == 0
    assert "loaded toy:int4: 8 tensors" in text.stdout
    assert "quantization: int4/g64 x1" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("load", "nothere"), "error: model not found in store"),
        (("load", "toy", "-c", "unet"), "error: no component 'unet'"),
        (("show", "bad name!"), "error: invalid model name"),
        (("verify", "nothere"), "error: model not found"),
        (("import", "/no/such/dir", "x"), "error: source is not a directory"),
    ],
)
def test_user_errors_are_one_line(
    store: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = cli(*args, "--store", str(store), tmp=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert cli(tmp=tmp_path).returncode == 2
    assert cli("load", tmp=tmp_path).returncode == 2
    assert cli("demo", "--size", "lots", tmp=tmp_path).returncode == 2
    assert cli("load", "x", "--dtype", "f64", tmp=tmp_path).returncode == 2


def test_verify_lists_bad_blobs(store: Path, tmp_path: Path) -> None:
    data = ok_json(cli("verify", "toy:latest", "--store", str(store), "--json", tmp=tmp_path))
    assert data["ok"] is True
    assert data["bad"] == []
    manifest = json.loads((store / "manifests/registry.ollama.ai/library/toy/latest").read_text())
    layer = manifest["layers"][0]
    blob = store / "blobs" / layer["digest"].replace(":", "-")
    data_bytes = bytearray(blob.read_bytes())
    data_bytes[-1] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data_bytes))
    missing = manifest["layers"][1]["digest"]
    (store / "blobs" / missing.replace(":", "-")).unlink()
    result = cli("verify", "toy:latest", "--store", str(store), "--json", tmp=tmp_path)
    assert result.returncode == 1
    bad = {b["digest"]: b for b in json.loads(result.stdout)["bad"]}
    assert sorted(bad) == sorted([layer["digest"], missing])
    assert bad[layer["digest"]]["problem"].startswith("content hashes to sha256:")
    assert bad[missing]["problem"] == "missing"
    count = len({manifest["config"]["digest"]} | {x["digest"] for x in manifest["layers"]})
    assert result.stderr == f"error: 2 of {count} blobs failed verification\n"


def test_import_command(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {"m.weight": rng.standard_normal((8, 64)).astype(np.float32)}, str(src / "m.safetensors")
    )
    (src / "config.json").write_text("{}")
    store = str(tmp_path / "store")
    args = ("import", str(src), "mine:q8", "--store", store, "--quantize", "q8", "--json")
    first = ok_json(cli(*args, "--layout", "data", tmp=tmp_path))
    assert first["tensors"] == 3
    assert first["quantization"] == "int8"
    assert first["new_blobs"] == first["blobs"] == 6  # weight, scale, qbias, 2 JSON, config
    assert first["store"] == store
    manifest = Path(store) / "manifests/registry.ollama.ai/library/mine/q8"
    before = manifest.read_bytes()
    refused = cli(*args, tmp=tmp_path)  # named layout this time: a different manifest
    assert refused.returncode == 1
    assert refused.stderr == (
        f"error: a model of that name is already in store {store!r}; pass force=True (CLI: "
        f"--force) to replace it (model 'mine:q8', file {str(manifest)!r})\n"
    )
    assert manifest.read_bytes() == before
    again = ok_json(cli(*args, "--layout", "data", "--force", tmp=tmp_path))
    assert again["new_blobs"] == 0
    text = cli(*args[:-1], "--force", tmp=tmp_path)
    assert text.returncode == 0
    assert text.stdout.startswith(f"imported mine:q8 into store {store}: 3 tensors in 3 blobs")
    loaded = ok_json(cli("load", "mine:q8", "--store", store, "--json", tmp=tmp_path))
    assert loaded["quantization"] == "int8"


def test_demo_generates_once_and_reuses(tmp_path: Path) -> None:
    first = ok_json(cli("demo", "--size", "4MiB", "--json", tmp=tmp_path))
    assert first["generated"] is True
    assert first["store"] == str(tmp_path / "cache" / "asyncweights" / "demo")
    plain, quant = first["loads"]
    assert plain["model"] == "asyncweights-demo:4mib"
    assert 3.5 * 2**20 < plain["bytes"] < 4.5 * 2**20
    assert plain["quantization"] is None
    assert sorted(plain["per_component"]) == ["text_encoder", "transformer", "vae"]
    assert plain["per_component"]["vae"]["dtypes"] == {
        "float32": plain["per_component"]["vae"]["tensors"]
    }
    assert quant["quantization"] == "int4"
    assert quant["per_component"]["vae"]["quantization"] == {}
    assert quant["per_component"]["transformer"]["quantization"]
    second = ok_json(cli("demo", "--size", "4MiB", "--json", tmp=tmp_path))
    assert second["generated"] is False
    assert second["loads"][0]["bytes"] == plain["bytes"]
    # A different size replaces the old one unless --keep.
    third = ok_json(cli("demo", "--size", "2MiB", "--json", tmp=tmp_path))
    assert sorted(third["removed"]) == ["asyncweights-demo:4mib", "asyncweights-demo:4mib-int4"]
    text = cli("demo", "--size", "2MiB", tmp=tmp_path)
    assert text.returncode == 0
    assert "(reused)" in text.stdout
    assert "GB/s" in text.stdout
    assert "peak memory: MLX" in text.stdout


def test_demo_into_a_named_store(tmp_path: Path) -> None:
    store = tmp_path / "mine"
    first = ok_json(cli("demo", "--store", str(store), "--size", "2MiB", "--json", tmp=tmp_path))
    assert first["store"] == str(store)
    assert first["generated"] is True
    assert [s["model"] for s in first["loads"]] == [
        "asyncweights-demo:2mib",
        "asyncweights-demo:2mib-int4",
    ]
    assert (store / "manifests" / "registry.ollama.ai" / "library" / "asyncweights-demo").is_dir()
    assert not (tmp_path / "cache" / "asyncweights" / "demo").exists()
    # A store the user named is never cleaned: the 2 MiB models stay beside the 1 MiB ones.
    other = ok_json(cli("demo", "--store", str(store), "--size", "1MiB", "--json", tmp=tmp_path))
    assert other["removed"] == []
    listed = ok_json(cli("ls", "--store", str(store), "--json", tmp=tmp_path))
    assert sorted(m["name"] for m in listed["models"]) == [
        "asyncweights-demo:1mib",
        "asyncweights-demo:1mib-int4",
        "asyncweights-demo:2mib",
        "asyncweights-demo:2mib-int4",
    ]


def test_readme_command_line_lists_every_command() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    listed = [line.split()[1] for line in block.splitlines() if line.startswith("asyncweights ")]
    assert sorted(set(listed) - {"--version"}) == sorted(commands.choices)


def test_every_argument_of_every_command_has_help() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(commands.choices) == [
        "demo", "import", "load", "ls", "pull", "rm", "show", "verify"
    ]  # fmt: skip
    parsers = {"asyncweights": parser} | {
        f"asyncweights {name}": sub for name, sub in commands.choices.items()
    }
    missing = [
        f"{prog}: {action.dest}"
        for prog, sub in parsers.items()
        for action in sub._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []
    helps = {name: [a.help for a in sub._actions] for name, sub in parsers.items()}
    assert all(len(set(h)) == len(h) for h in helps.values())  # no copy-pasted help lines


def test_progress_bar_on_a_terminal_only(store: Path, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    status, output = run_on_pty(["load", "toy:latest", "--store", str(store)], env)
    assert status == 0
    assert b"%|" in output  # tqdm's bar
    assert b"loaded toy:latest: 4 tensors" in output
    status, output = run_on_pty(["verify", "toy:latest", "--store", str(store)], env)
    assert status == 0
    assert b"verifying" in output
    status, output = run_on_pty(["ls", "--store", str(store), "--no-progress"], env)
    assert status == 0
    assert b"%|" not in output
    piped = cli("load", "toy:latest", "--store", str(store), tmp=tmp_path)
    assert piped.returncode == 0
    assert "%|" not in piped.stderr
    assert piped.stderr == ""
    forced = cli("load", "toy:latest", "--store", str(store), "--progress", tmp=tmp_path)
    assert "%|" in forced.stderr


_INTERRUPTED = textwrap.dedent(
    """
    import os, stat, sys, time
    real = os.fsync
    def slow_fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            print("writing", file=sys.stderr, flush=True)
            time.sleep(0.5)
        real(fd)
    os.fsync = slow_fsync
    from asyncweights._cli import main
    main(sys.argv[1:])
    """
)


def test_ctrl_c_exits_130_without_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tensors = {f"t{i}.weight": np.full((4, 4), i, dtype=np.float32) for i in range(50)}
    save_file(tensors, str(src / "m.safetensors"))
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, "import", str(src), "m", "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("writing")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert stdout == ""
    assert "Traceback" not in stderr
    assert not [p for p in (store / "manifests").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 << 20), ("1GiB", 1 << 30), ("64M", 64 << 20), ("1.5GB", 1_500_000_000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_import_command_variant_and_refused_formats(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    plain = {"conv_in.weight": np.ones((4, 4), np.float32)}
    save_file(plain, str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    half = {"conv_in.weight": np.ones((4, 4), np.float16)}
    save_file(half, str(src / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    index = {"_class_name": "P", "unet": ["diffusers", "UNet2DConditionModel"]}
    (src / "model_index.json").write_text(json.dumps(index))
    store = str(tmp_path / "store")
    data = ok_json(
        cli("import", str(src), "p", "--store", store, "--variant", "fp16", "--json", tmp=tmp_path)
    )
    assert data["components"] == ["unet"]
    shown = ok_json(cli("show", "p", "--store", store, "--json", tmp=tmp_path))
    assert sorted(shown["dtypes"]) == ["F16"]  # the fp16 variant, not the plain F32 file
    barred = cli("import", str(src), "p2", "--store", store, "--progress", tmp=tmp_path)
    assert barred.returncode == 0, barred.stderr
    assert "importing p2" in barred.stderr
    assert "%|" in barred.stderr  # the import's tqdm bar, bytes hashed and written
    (src / "model_index.json").unlink()
    (src / "unet" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8"}})
    )
    refused = cli("import", str(src / "unet"), "q", "--store", store, tmp=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "error: pre-quantized FP8 (block-scaled, weight_scale_inv) checkpoint (config.json "
        "quantization_config) is not imported"
    )


HOSTILE_COMPONENT = "\x1b]0;owned\x07\x1b[2J\u202edcba\u009b31m"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (fast; the subprocess tests above cover the entry point)."""
    from asyncweights._cli import run

    status = run(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_names_with_terminal_escapes_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hostile layer (component) name cannot drive the terminal: every non-printable
    character is printed escaped, in text and in JSON, and JSON still decodes to the name."""
    root = str(tmp_path / "store")
    StoreBuilder(root).add_model("evil", random_weights({f"{HOSTILE_COMPONENT}/w": (4, 4)}))
    escaped = "\\x1b]0;owned\\x07\\x1b[2J\\u202edcba\\x9b31m"
    outputs = []
    for args in (("show", "evil"), ("load", "evil"), ("show", "evil", "--json")):
        status, out, err = run_cli(capsys, *args, "--store", root)
        assert status == 0, err
        outputs.append(out)
        assert all(c.isprintable() or c == "\n" for c in out), repr(out)
    assert escaped in outputs[0]
    assert escaped in outputs[1]
    assert HOSTILE_COMPONENT in json.loads(outputs[2])["components"]
    status, out, err = run_cli(capsys, "load", "evil\x1b[2J", "--store", root)
    assert status == 1
    assert err.startswith("error: invalid model name")
    assert "\x1b" not in err
    assert "\\x1b" in err


ESCAPED = "\\x1b]0;owned\\x07\\x1b[2J\\u202edcba\\x9b31m"  # HOSTILE_COMPONENT, printed


def assert_printable(*texts: str) -> None:
    """Nothing in `texts` can drive a terminal: every character printable, or a newline."""
    for text in texts:
        assert all(c.isprintable() or c == "\n" for c in text), repr(text)


def test_every_command_escapes_hostile_names_and_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store path, a layer (component) name and a source path that carry terminal escape
    sequences come out escaped from ls, verify, rm, import and show, on stdout, in errors
    and in the progress bar; JSON keeps the exact values."""
    root = tmp_path / f"store{HOSTILE_COMPONENT}"
    built = StoreBuilder(root).add_model(
        "evil", random_weights({f"{HOSTILE_COMPONENT}/w": (4, 4), "vae/x": (4,)})
    )
    store = ["--store", str(root)]
    status, out, err = run_cli(capsys, "ls", *store)
    assert (status, err) == (0, "")
    assert_printable(out)
    assert f"components vae,{ESCAPED}, unquantized" in out
    status, out, err = run_cli(capsys, "ls", *store, "--json")
    assert status == 0, err
    assert_printable(out)
    listed = json.loads(out)
    assert listed["store"] == str(root)
    assert listed["models"][0]["components"] == ["vae", HOSTILE_COMPONENT]

    # load of a manifest given by a hostile path, with its progress bar.
    manifest = tmp_path / f"m{HOSTILE_COMPONENT}"
    manifest.write_bytes(built.path.read_bytes())
    status, out, err = run_cli(capsys, "load", str(manifest), *store, "--progress")
    assert status == 0, err
    assert_printable(out, err.replace("\r", ""))
    assert out.startswith(f"loaded {tmp_path}/m{ESCAPED}: 2 tensors")
    assert "loading" in err  # the bar was drawn

    # verify: a damaged blob of the hostile layer is reported by its escaped name.
    layer = next(la for la in built.layers if la.name and la.name.startswith(HOSTILE_COMPONENT))
    blob = root / "blobs" / layer.digest.replace(":", "-")
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    status, out, err = run_cli(capsys, "verify", "evil", *store, "--progress")
    assert status == 1
    assert_printable(out, err.replace("\r", ""))
    assert f"  BAD {layer.digest} ({ESCAPED}/w): content hashes to sha256:" in out
    assert "verifying evil" in err  # the bar was drawn, with nothing raw in it
    assert err.endswith("error: 1 of 4 blobs failed verification\n")

    # Errors that name the store or a source path.
    status, out, err = run_cli(capsys, "show", "nothing", *store)
    assert (status, out) == (1, "")
    assert_printable(err)
    assert err.startswith(f"error: model not found in store '{tmp_path}/store{ESCAPED}'")
    source = tmp_path / f"src{HOSTILE_COMPONENT}"
    status, out, err = run_cli(capsys, "import", str(source), "x", *store)
    assert (status, out) == (1, "")
    assert_printable(err)
    assert err.startswith("error: source is not a directory (model 'x', store ")
    assert f"file '{tmp_path}/src{ESCAPED}')" in err

    # rm names the store it deleted from.
    status, out, err = run_cli(capsys, "rm", "evil", *store)
    assert (status, err) == (0, "")
    assert_printable(out)
    assert out.startswith(f"deleted 'evil' from store {tmp_path}/store{ESCAPED}: 4 blobs removed")


def test_pull_errors_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registry's own error message (what it says is untrusted text) and a registry URL
    with escape sequences are printed escaped."""
    from .registry_support import fake_registry

    store = ["--store", str(tmp_path / "store")]
    with fake_registry() as (registry, _):
        registry.manifest_status = (412, f"requires {HOSTILE_COMPONENT}")
        status, out, err = run_cli(capsys, "pull", "img", *store, "--registry", registry.url)
    assert (status, out) == (1, "")
    assert_printable(err)
    assert err == (
        f"error: HTTP 412 Precondition Failed for the manifest: requires {ESCAPED} "
        f"(model 'img', registry {registry.url}, repository library/img)\n"
    )
    status, out, err = run_cli(
        capsys, "pull", "img", *store, "--registry", f"ftp://127.0.0.1:1/{HOSTILE_COMPONENT}"
    )
    assert (status, out) == (1, "")
    assert_printable(err)
    assert ESCAPED in err
    assert not (tmp_path / "store" / "manifests").exists()


def test_a_model_argument_is_a_path_only_when_it_looks_like_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    built = StoreBuilder(root).add_model("toy", random_weights({"w": (2,)}))
    status, out, err = run_cli(capsys, "load", str(built.path), "--store", str(root), "--json")
    assert status == 0, err
    assert json.loads(out)["tensors"] == 1
    monkeypatch.chdir(root)
    relative = "./" + str(built.path.relative_to(root))
    status, out, err = run_cli(capsys, "load", relative, "--store", str(root), "--json")
    assert status == 0, err
    # Without ./ a relative path is a name, and no model has it.
    status, out, err = run_cli(capsys, "load", relative.removeprefix("./"), "--store", str(root))
    assert status == 1
    assert err.startswith("error: invalid model name") or "model not found" in err, err
    status, out, err = run_cli(capsys, "load", "/dev/zero", "--store", str(root))
    assert status == 1
    assert "manifest is not a regular file (a character device)" in err
