"""loracore.env: the first lesson's environment check."""

from loracore import env


def test_everything_the_course_needs_is_installed(capsys):
    assert env.check_environment() is True
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(env.REQUIREMENTS) and all(l.startswith("OK") for l in lines)


def test_a_missing_or_old_package_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(env, "REQUIREMENTS", env.REQUIREMENTS + (
        ("no-such-package-xyz", "no_such_package_xyz", "1.0", "nothing"),
        ("torch", "torch", "999.0", "a future torch"),
    ))
    assert env.check_environment() is False
    out = capsys.readouterr().out
    assert "FAIL  no-such-package-xyz missing" in out and "make venv" in out
    assert any(l.startswith("FAIL  torch") and "999.0" in l for l in out.splitlines())


def test_version_comparison_reads_local_and_dev_versions():
    assert env._as_tuple("2.13.0+cpu") == (2, 13, 0)
    assert env._as_tuple("0.50.0.dev0") == (0, 50, 0)
    assert env.PackageStatus("x", "0.11.0", "0.11", "").ok
    assert not env.PackageStatus("x", "0.9.2", "0.11", "").ok


def test_only_the_kernel_hub_notice_of_bitsandbytes_is_silenced(caplog):
    """loracore drops bitsandbytes' 'could not fetch the CPU kernel' line (offline by design),
    and nothing else that logger says."""
    import logging

    import loracore  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]

    log = logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        log.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
                    " because Hugging Face Hub is in offline mode.")
        log.warning("Skipping publisher trust check for 'someone/else' because ...")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone/else' because ..."]


def test_importing_peft_and_bitsandbytes_offline_prints_nothing_after_loracore():
    """The notebooks' cells that import PEFT or bitsandbytes store no stderr, and nbval fails a
    checked cell whose run writes any: a fresh process, offline as in CI, must stay silent."""
    import os
    import subprocess
    import sys

    code = "import loracore, bitsandbytes.functional, peft, peft.utils.merge_utils"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", f"stderr was not empty:\n{run.stderr}"
