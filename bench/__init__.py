"""The benchmark suite (`make bench`): each figure of issue 7 (M1–M7) beside its baseline, measured in the same run."""
