"""Tests for guided_diffusion.layout: the names every writer and reader of the run folders share."""
from pathlib import Path

from guided_diffusion.layout import checkpoint_name, eval_paths, prediction_paths, row_folder


def test_checkpoint_names_sort_by_step():
    names = [checkpoint_name(s) for s in (9, 10, 1234567, 100)]
    assert sorted(names) == [checkpoint_name(s) for s in (9, 10, 100, 1234567)]
    assert checkpoint_name(42) == "model_0000042.pt"


def test_prediction_and_eval_paths_are_the_readme_contract():
    paths = prediction_paths(Path("out"), "ISIC_0000001")
    assert {k: str(v) for k, v in paths.items()} == {
        "mask": "out/ISIC_0000001.png", "prob": "out/prob/ISIC_0000001.png",
        "uncertainty": "out/uncertainty/ISIC_0000001.png", "overlay": "out/overlays/ISIC_0000001.png"}
    assert {k: str(v) for k, v in eval_paths(Path("out")).items()} == {
        "csv": "out/eval/evaluation.csv", "json": "out/eval/evaluation.json", "split": "out/eval/split.json"}


def test_row_folders_differ_by_sampler_steps_members_and_tag():
    folders = {row_folder(Path("r"), "ddim", 10, 5), row_folder(Path("r"), "ddim", 10, 1),
               row_folder(Path("r"), "ddim", 20, 5), row_folder(Path("r"), "ddim", 10, 5, tag="td1"),
               row_folder(Path("r"), "dpm_solver++", 10, 5)}
    assert len(folders) == 5 and Path("r/ddim-10-n5-td1") in folders
