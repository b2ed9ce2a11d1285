"""The checkpoint guard: the settings that decide a module's state-dict shapes, compared before any weight loads.

A checkpoint of another network (or another number of EMAs, or with a target network where the model has
none) is refused by name, before PyTorch's list of mismatched tensor sizes; the same comparison refuses a
teacher or ``init_from`` file whose network differs from the student's.
"""


def network_structure(hparams: dict) -> dict:
    """The network's class and arguments (dropout aside: it changes no shape), from a module's hparams."""
    net = hparams.get("net")
    if not isinstance(net, dict):
        return {}
    return {"net": net.get("class_path")} | {f"net.{k}": v for k, v in net.get("init_args", {}).items() if k != "dropout"}


def module_structure(hparams: dict) -> dict:
    """What every method's state dict depends on: the network and the number of evaluation EMAs."""
    out = network_structure(hparams)
    if "ema_decays" in hparams:
        out["number of ema_decays"] = len(hparams["ema_decays"])
    return out


def structure_refusal(saved: dict, mine: dict, cls_name: str) -> str | None:
    """The refusal of a checkpoint whose structure ``saved`` differs from the model's ``mine``; None if it fits."""
    differ = [k for k in mine if k in saved and saved[k] != mine[k]]
    if not differ:
        return None
    return ("the checkpoint was trained with other network settings: "
            + "; ".join(f"{k}: checkpoint {saved[k]!r}, model {mine[k]!r}" for k in differ)
            + f". Build the model from the checkpoint ({cls_name}.load_from_checkpoint, or "
            "--ckpt_path with the CLI, which takes the checkpoint's settings).")


def network_differences(teacher: dict, student: dict) -> list[str]:
    """The network settings (class and arguments, dropout aside) and σ_data on which two modules' hparams differ."""
    mine, theirs = network_structure(student), network_structure(teacher)
    out = [f"{k}: teacher {theirs.get(k)!r}, student {mine.get(k)!r}" for k in sorted(mine | theirs)
           if mine.get(k) != theirs.get(k)]
    if teacher.get("sigma_data", 0.5) != student.get("sigma_data", 0.5):
        out.append(f"sigma_data: teacher {teacher.get('sigma_data', 0.5)}, student {student.get('sigma_data', 0.5)}")
    return out
