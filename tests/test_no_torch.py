"""The service runs without the `train` extra: nothing under daemon/ pulls in torch."""

import subprocess
import sys
import textwrap


def test_daemon_imports_without_torch():
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import daemon
        for module in pkgutil.walk_packages(daemon.__path__, "daemon."):
            importlib.import_module(module.name)
        for name in ("imaging", "export", "db"):
            package = importlib.import_module(name)
            for module in pkgutil.walk_packages(package.__path__, name + "."):
                if ".migrations" in module.name:
                    continue
                importlib.import_module(module.name)
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_training_command_explains_missing_extra():
    code = textwrap.dedent(
        """
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("No module named 'torch'")
        sys.meta_path.insert(0, BlockTorch())
        from daemon.cli import main
        sys.exit(main(["train", "--modality", "CT"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train" in result.stderr and "extra" in result.stderr
