"""The service runs without the `train` extra: nothing but model_training pulls in torch."""

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
        import headscreen
        # The root's own modules (errors, privacy, the bundle contract), then every layer
        # but model_training.
        for module in pkgutil.iter_modules(headscreen.__path__, "headscreen."):
            if not module.ispkg:
                importlib.import_module(module.name)
        for name in ("headscreen.daemon", "headscreen.imaging", "headscreen.export", "headscreen.db"):
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
        from headscreen.daemon.cli import main
        sys.exit(main(["train", "--modality", "CT"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "train" in result.stderr and "extra" in result.stderr
