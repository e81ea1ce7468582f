"""The one tuner registry: each tuner package registers its peft method and its stage-2 entry on
import (``mllm.tuners`` imports them); what the model may do with a tuner (pair an encoder, merge,
merge into a 4-bit LLM) is read from its peft config class, never from its name."""

from __future__ import annotations

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from mllm.config import TunerConfig
from mllm.tuners import (
    CAPABILITY_DEFAULTS,
    CAUSAL_LM,
    TUNER_REGISTRY,
    build_peft_config,
    merge_refusal,
    tuner_capability,
    tuner_names,
)
from mllm.tuners.registration import extend_peft_type


def test_every_entry_builds_its_config_class():
    assert set(tuner_names(CAUSAL_LM)) == {"lora", "dora", "moka", "mora", "delo"}
    for name in tuner_names(CAUSAL_LM):
        entry = TUNER_REGISTRY[name]
        config = build_peft_config(TunerConfig(type=name, r=4, alpha=8))
        assert type(config) is entry.config_class, name
        if name in ("moka", "mora", "delo"):   # the project's own methods are known to peft by name
            assert PEFT_TYPE_TO_CONFIG_MAPPING[extend_peft_type(name)] is entry.config_class


def test_capabilities_come_from_the_config_class():
    table = {name: {c: tuner_capability(name, c) for c in CAPABILITY_DEFAULTS} for name in tuner_names(CAUSAL_LM)}
    assert table["mora"]["pairs_with_encoder"] and not any(table[n]["pairs_with_encoder"] for n in table if n != "mora")
    assert {n for n in table if not table[n]["mergeable"]} == {"moka", "delo"}
    assert {n for n in table if table[n]["partitions_tasks"]} == {"delo"}
    for name in table:   # a tuner that cannot merge says why
        assert bool(merge_refusal(name)) == (not table[name]["mergeable"])
    with pytest.raises(ValueError, match=r"tuner\.type: unknown tuner type 'fancy'"):
        tuner_capability("fancy", "mergeable")


def test_registration_imports_no_tuner():
    """registration.py only extends peft's enum; the tuner packages register themselves."""
    import ast

    import mllm.tuners.registration as registration

    tree = ast.parse(open(registration.__file__).read())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert imported and not [m for m in imported if m and m.startswith("mllm")], imported
