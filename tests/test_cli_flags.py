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


@pytest.mark.parametrize("verb", ["train", "compare"])
def test_every_option_has_a_spelling_torchrun_passes_on(verb):
    """``torchrun ... -m adaconvert.cli train ...``: torchrun's own parser (the real one) takes any flag that
    abbreviates one of its options (``--r`` for ``--rdzv-*``, ``--role``...) and fails. Every option of the verbs
    that run under it needs a spelling that reaches us (``--r`` has ``--rank``)."""
    import contextlib
    import io

    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def reaches_us(spelling: str) -> bool:
        argv = ["--standalone", "--nproc_per_node", "2", "-m", "adaconvert.cli", verb, spelling, "1"]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return parser.parse_args(argv).training_script_args == [verb, spelling, "1"]
        except SystemExit:
            return False

    unreachable = []
    for param in cli.commands[verb].params:
        for spellings in (param.opts, param.secondary_opts):
            long = [s for s in spellings if s.startswith("--")]
            if long and not any(reaches_us(s) for s in long):
                unreachable.append(long)
    assert unreachable == []
    assert not reaches_us("--r") and reaches_us("--rank")  # the case this guards, as torchrun parses it today
