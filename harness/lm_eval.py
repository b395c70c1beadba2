"""lm-eval's own command line, with this project's model types registered:

    python -m harness.lm_eval --model regla --model_args pretrained=<checkpoint dir> \
        --tasks regla_define,regla_lastword --include_path harness/tasks
    python -m harness.lm_eval --model hf --model_args pretrained=<checkpoint dir> --tasks ...

`--model regla` is the harness's adapter (harness.lm_eval_model); `--model hf` is lm-eval's
transformers adapter on the exported model (harness.hf registers model_type "regla" with
transformers' Auto classes). lm-eval's CLI finds neither without these imports, hence this thin
wrapper (the way fla ships one). Every other argument is lm-eval's own: `--help` lists them.
`--include_path harness/tasks` adds the offline suite, whose data is built from the installed
offline-english corpus on first use.
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from . import hf, lm_eval_model  # noqa: F401  (registration: "regla" with lm-eval and with transformers)


def main() -> None:
    cli_evaluate()


if __name__ == "__main__":
    main()
