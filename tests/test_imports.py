"""Fast, quiet start: the command line and `import mllm` import neither torch nor peft, while the
project's peft methods are registered whichever way peft arrives (DESIGN contract 3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "peft", "transformers", "bitsandbytes")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_top_level_help_imports_no_heavy_package():
    done = _python("import contextlib, io, sys\n"
                   "from mllm.cli import main\n"
                   "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                   "    assert main(['--help']) == 0\n"
                   "assert 'instruct' in out.getvalue()\n"
                   f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and done.stderr == ""


@pytest.mark.parametrize("first_import", [
    "from peft import PeftModel",                      # a user's own peft import after `import mllm`
    "from mllm.tuners.moka import MokaConfig",         # the project's tuners pull peft in themselves
    "from mllm.tuners.delo import DeloModel",
    # transformers probes for peft with importlib.util.find_spec before anything imports it
    "import importlib.util, transformers; importlib.util.find_spec('peft'); import peft",
])
def test_methods_are_registered_however_peft_arrives(first_import):
    done = _python("import mllm\n"
                   f"{first_import}\n"
                   "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
                   "print(sorted(k for k in ('MOKA', 'MORA', 'DELO') if k in PEFT_TYPE_TO_TUNER_MAPPING))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['DELO', 'MOKA', 'MORA']"


def test_peft_imported_before_mllm_registers_at_once():
    done = _python("import peft\nimport mllm\n"
                   "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
                   "print('MOKA' in PEFT_TYPE_TO_TUNER_MAPPING)")
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_scoring_existing_answers_imports_no_heavy_package(tmp_path):
    """`mllm eval --answers` only scores: no torch, peft or transformers."""
    (tmp_path / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n'
        '{"question_id": 2, "image": "b.jpg", "text": "Is there a dog?", "label": "no"}\n')
    (tmp_path / "answers.jsonl").write_text('{"question": "Is there a cat?", "answer": "Yes"}\n'
                                            '{"question": "Is there a dog?", "answer": "yes"}\n')
    done = _python("import sys\n"
                   "from mllm.cli import main\n"
                   f"rc = main(['eval', '--suite', 'pope', '--data', {str(tmp_path / 'coco_pope_random.json')!r}, "
                   f"'--answers', {str(tmp_path / 'answers.jsonl')!r}, '--output-dir', {str(tmp_path / 'out')!r}])\n"
                   f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
