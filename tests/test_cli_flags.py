"""The command line's own shape: every verb's flags are unique (click only warns about a duplicate, and then one of
the two options silently takes the other's value)."""

from __future__ import annotations

from collections import Counter

import pytest

from adaconvert.cli.main import cli


@pytest.mark.parametrize("verb", sorted(cli.commands))
def test_every_flag_and_parameter_name_is_declared_once(verb):
    params = cli.commands[verb].params
    spellings = Counter(s for p in params for s in (*p.opts, *p.secondary_opts))
    # several flags may set one parameter only as a feature switch (--bf16 / --fp16 → precision_flag)
    names = Counter(p.name for p in params if not (getattr(p, "is_flag", False) and not p.is_bool_flag))
    assert [s for s, n in spellings.items() if n > 1] == []
    assert [s for s, n in names.items() if n > 1] == []
