"""Regenerate megatron_tst/megatron_lm_flag_list.py: every option string Megatron-LM's own parser
builds, by its group title. Run it outside the repository against the installed megatron-core:

    git -C MEGATRON_LM archive core_v0.16.1 megatron/training megatron/legacy | tar -x -C SCRATCH
    ln -s SITE_PACKAGES/megatron/core SCRATCH/megatron/core
    # SCRATCH/megatron/training/__init__.py: drop its initialize/training imports (they need triton)
    PYTHONPATH=SCRATCH python tools/megatron_lm_flag_list.py > megatron_tst/megatron_lm_flag_list.py
"""

import argparse
import sys

from megatron.training.arguments import add_megatron_arguments

# Added only where NVIDIA's kitchen package is installed (_add_kitchen_quantization_arguments)
KITCHEN = ("--kitchen-config-file", "--kitchen-recipe-number")


def main():
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    groups: dict[str, list[str]] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            groups.setdefault(group.title, []).extend(
                s for s in action.option_strings if s.startswith("--") and s != "--help")
    groups["kitchen"] = list(KITCHEN)
    print('"""Every option string of Megatron-LM core_v0.16.1\'s parse_args (megatron/training/arguments.py,')
    print("commit 55ac7082517c3878ae653c07c09c534b8aed49f6), by its argument-group title: the literal flags and")
    print("those ArgumentGroupFactory generates from TransformerConfig and training_config.py's dataclasses.")
    print("Produced by tools/megatron_lm_flag_list.py, which runs Megatron-LM's own add_megatron_arguments")
    print("against the installed megatron-core 0.16.1; the kitchen group (present only with NVIDIA's kitchen")
    print("package) is added by hand. Names only; pretrain_gpt.py's optional modelopt flags are not included.")
    print('"""')
    print()
    print("GROUPS = {")
    for title, flags in groups.items():
        if not flags:
            continue
        print(f"    {title!r}: (")
        line = "       "
        for flag in flags:
            item = f" {flag!r},"
            if len(line) + len(item) > 110:
                print(line)
                line = "       "
            line += item
        print(line)
        print("    ),")
    print("}")


if __name__ == "__main__":
    main()
