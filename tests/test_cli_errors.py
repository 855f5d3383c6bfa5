"""The CLI's answer to bad input and a bad environment: one line naming what was wrong and
exit status 2, never a traceback (masa_rt.cli.main), for the serving-side commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zmq

from masa_rt.cli import is_user_facing, main

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "pour_milk.npz"
RECORDING = ROOT / "examples" / "demos" / "pour_milk.npz"


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of ``masa-rt ARGV`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_user_facing_errors_are_marked_or_builtin():
    class Marked(RuntimeError):
        user_facing = True

    assert is_user_facing(ValueError()) and is_user_facing(IsADirectoryError())
    assert is_user_facing(Marked()) and not is_user_facing(RuntimeError("a bug"))
    from clients.errors import ConnectionLost
    from engine.backends.base import BackendError

    assert is_user_facing(ConnectionLost()) and is_user_facing(BackendError())


def test_a_bug_still_shows_its_traceback(monkeypatch):
    import engine.serve_commands as sc

    def boom(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sc, "prepare", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["serve", "--reference", str(REFERENCE)])


@pytest.mark.parametrize("argv, said", [
    (["replay", RECORDING, "--duration", "0"], "--duration: expected a finite number > 0"),
    (["replay", RECORDING, "--rate", "0"], "--rate: expected a finite number > 0"),
    (["replay", RECORDING, "--clients", "0"], "--clients: expected an integer >= 1"),
    (["serve", "--reference", REFERENCE, "--max-sessions", "0"], "--max-sessions"),
    (["serve", "--reference", REFERENCE, "--idle-timeout", "-1"], "--idle-timeout"),
    (["bench", "--streams", "0"], "--streams: expected an integer >= 1"),
    (["bench", "--iters", "x"], "--iters: expected an integer >= 1, found 'x'"),
    (["demo", "--duration", "nan"], "--duration: expected a finite number > 0"),
])
def test_bad_numbers_are_refused_by_name(capsys, argv, said):
    code, err = run(capsys, *argv)
    assert code == 2 and said in err


def test_replaying_a_reference_says_what_it_is(capsys):
    code, err = run(capsys, "replay", REFERENCE)
    assert code == 2 and "is a built reference, not a recording" in err
    assert "Traceback" not in err


def test_files_that_are_not_what_they_claim(capsys, tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    code, err = run(capsys, "replay", text)
    assert code == 2 and f"{text}: not a .npz sequence file" in err
    keyless = tmp_path / "keyless.npz"
    np.savez(keyless, x=np.zeros(3))
    code, err = run(capsys, "export-raw", keyless, tmp_path / "out.masaraw")
    assert code == 2 and "missing joints, layout, fps (has x)" in err
    fake = tmp_path / "fake.onnx"
    fake.write_text("not protobuf")
    code, err = run(capsys, "serve", "--model", fake, "--reference", REFERENCE)
    assert code == 2 and "not an ONNX model" in err
    code, err = run(capsys, "serve", "--reference", tmp_path)
    assert code == 2 and "is a directory" in err


def test_bad_addresses_and_ports_in_use(capsys):
    code, err = run(capsys, "replay", RECORDING, "--address", "nonsense")
    assert code == 2 and "cannot connect to 'nonsense'" in err
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    try:
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        code, err = run(capsys, "serve", "--reference", REFERENCE,
                        "--bind", f"tcp://127.0.0.1:{port}", "--pub", "tcp://127.0.0.1:0")
        assert code == 2 and "cannot bind" in err and "Address already in use" in err
    finally:
        taken.close(0)
        ctx.term()


def test_gpu_backends_without_a_gpu_say_so(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: nothing to refuse")
    code, err = run(capsys, "serve", "--reference", REFERENCE, "--backend", "torch",
                    "--device", "cuda")
    assert code == 2 and "torch sees no CUDA GPU" in err
    # --device is not given: TensorRT's own device, so the answer is about TensorRT
    code, err = run(capsys, "serve", "--reference", REFERENCE, "--backend", "tensorrt")
    assert code == 2 and "--device" not in err and "TensorRT" in err


def test_replay_checks_its_report_path_before_replaying(capsys, tmp_path):
    code, err = run(capsys, "replay", RECORDING, "--json", tmp_path / "no" / "such" / "r.json")
    assert code == 2 and "cannot write into" in err
    code, err = run(capsys, "replay", RECORDING, "--json", RECORDING)
    assert code == 2 and "also an input" in err


@pytest.mark.parametrize("argv, level", [
    (["synth", "--out", "X"], "INFO"),
    (["-v", "synth", "--out", "X"], "DEBUG"),
    (["synth", "--out", "X", "-v"], "DEBUG"),
    (["synth", "-q", "--out", "X"], "WARNING"),
    (["--log-level", "ERROR", "synth", "--out", "X"], "ERROR"),
    (["reference", "build", "d.npz", "-o", "r.npz", "--log-level", "DEBUG"], "DEBUG"),
])
def test_logging_flags_go_before_or_after_the_subcommand(argv, level):
    from masa_rt.cli import build_parser

    assert build_parser().parse_args(argv).log_level == level


@pytest.mark.parametrize("command", ["serve", "replay"])
@pytest.mark.parametrize("kind, said", [("truncated", "File is not a zip file"),
                                        ("empty", "No data left in file"),
                                        ("npy", "one .npy array")])
def test_a_broken_file_is_one_line_not_a_traceback(tmp_path, capsys, command, kind, said):
    path = tmp_path / ("f.npy" if kind == "npy" else "f.npz")
    if kind == "truncated":
        path.write_bytes(REFERENCE.read_bytes()[:1000])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        np.save(path, np.zeros(3))
    argv = ["serve", "--reference", path] if command == "serve" else ["replay", path]
    code, err = run(capsys, *argv)
    assert code == 2 and said in err and str(path) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_reference_build_into_a_missing_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "r.npz"
    code, err = run(capsys, "reference", "build", RECORDING, "-o", out)
    assert code == 2 and "does not exist" in err and not (tmp_path / "no").exists()


def test_a_five_frame_demo_is_refused(tmp_path, capsys):
    import dataclasses

    from masa_rt.sequence import load_sequence, save_sequence

    seq = load_sequence(RECORDING)
    short = tmp_path / "short.npz"
    cut = {f: getattr(seq, f)[:5] for f in ("joints", "timestamps", "phases", "canonical_time")
           if getattr(seq, f) is not None}
    save_sequence(short, dataclasses.replace(seq, **cut))
    out = tmp_path / "r.npz"
    code, err = run(capsys, "reference", "build", short, "-o", out)
    assert code == 2 and "too short" in err and "5 frames" in err and not out.exists()
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, shown", [
    (["serve"], "(default: 256)"),  # --max-sessions, which has no help text of its own
    (["bench"], "(default: [1, 8, 64, 256])"),
    (["serve"], "(default: the shipped model)"),  # said by the help itself, not repeated
])
def test_help_shows_the_defaults(capsys, argv, shown):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert shown in text and "(default: None)" not in text
    assert "(default: the shipped model) (default" not in text
