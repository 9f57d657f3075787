"""The promotion gate scores a champion trained on other data by the raw values of the candidate's test rows,
encoded as the champion encodes them (its own text categories, its own class order): a real sqlite MLflow
registry, torch.export models, no Ray."""

import mlflow
import numpy as np
import torch
from torch import nn

from shipyard import DataInfo, load_config
from shipyard.tasks import task_of
from shipyard.track import runs as tracking


def info(colours: list[str], classes: list[str]) -> DataInfo:
    return DataInfo(
        task="classification",
        input_shape=[2],
        output_width=len(classes),
        target="answer",
        feature_names=["size", "colour"],
        classes=classes,
        preprocessing={"numeric": {"size": {"mean": 0.0, "std": 1.0}}, "categorical": {"colour": colours}},
    )


def test_a_champion_with_other_categories_and_classes_is_scored_on_the_raw_rows(tmp_path):
    cfg = load_config(None, {"tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "name": "colours"})
    tracking.setup(cfg)
    # the champion learnt colours green/red and classes maybe/no/yes; it answers "yes" exactly for red
    champion_task = task_of(info(["green", "red"], ["maybe", "no", "yes"]).to_dict())
    model = champion_task.build_model(cfg.model)
    linear = nn.Linear(3, 3)  # encoder output: [size, colour == green, colour == red]
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[2, 2] = 4.0
        linear.bias.copy_(torch.tensor([-5.0, 2.0, 0.0]))
    model.net = linear
    with mlflow.start_run():
        version = tracking.log_model(
            model.eval(),
            np.array([[0.5, 1.0], [0.1, 0.0]], np.float32),
            cfg,
            champion_task.info.classes,
            ["size", "colour"],
            {},
            info=champion_task.info.to_dict(),
        )
    # the candidate's test split, in its own encoding: colours red=0, yellow=1; classes no=0, yes=1
    candidate = task_of(info(["red", "yellow"], ["no", "yes"]).to_dict())
    x = np.array([[0.3, 0], [1.2, 1], [-0.5, 0], [2.0, 1], [0.1, 0]], np.float32)
    y = np.array([1, 0, 1, 0, 1])
    # read with the champion's codes, red rows would be green ones and class 1 "no": the champion misjudged
    misread = tracking.evaluate_model(model, candidate, x, y)["accuracy"]
    assert misread < 0.7
    assert tracking.score_version("colours", version, x, y, candidate) == 1.0

    # a candidate whose split holds a class the champion never learnt: it cannot be scored on it
    other = task_of(info(["red", "yellow"], ["no", "yes", "later"]).to_dict())
    assert tracking.score_version("colours", version, x, np.array([2, 0, 1, 0, 1]), other) is None
