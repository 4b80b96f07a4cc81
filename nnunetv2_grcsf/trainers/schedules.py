"""Short-run trainer variants, generated from one table (nnU-Net's ``nnUNetTrainer_Xepochs`` style).

``<Trainer>_<suffix>`` is a subclass of ``<Trainer>`` whose ``schedule`` overrides a few nnUNetTrainer
attributes. The ``epochs`` variants mean what nnU-Net's own ``_Xepochs`` variants mean (250
iterations per epoch); the ``iters`` variants also shorten epochs, for CPU runs, tests and the demo.
"""

SCHEDULES = {
    "1epoch": {"num_epochs": 1},
    "5epochs": {"num_epochs": 5},
    "10epochs": {"num_epochs": 10},
    "20epochs": {"num_epochs": 20},
    "50epochs": {"num_epochs": 50},
    "100epochs": {"num_epochs": 100},
    "250epochs": {"num_epochs": 250},
    "500epochs": {"num_epochs": 500},
    # CPU budgets: tests and CI (seconds), the demo (minutes), short benchmarks; the GPU check's smoke runs.
    "1epoch_10iters": {"num_epochs": 1, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 2},
    "2epochs_4iters": {"num_epochs": 2, "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 2},
    "5epochs_20iters": {"num_epochs": 5, "num_iterations_per_epoch": 20, "num_val_iterations_per_epoch": 5},
    "20epochs_25iters": {"num_epochs": 20, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5},
    "10epochs_25iters": {"num_epochs": 10, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5},
}


def schedule_variants(base_trainers, module_name: str, base_name: str = None, suffixes=tuple(SCHEDULES)) -> dict:
    """``{name: class}`` of every ``<base>_<suffix>`` for the given base trainer classes and schedule suffixes;
    ``base_name`` replaces the class name of a single base in the variants' names."""
    variants = {}
    for base in base_trainers:
        for suffix in suffixes:
            name = f"{base_name or base.__name__}_{suffix}"
            variants[name] = type(name, (base,), {"schedule": {**base.schedule, **SCHEDULES[suffix]},
                                                  "__module__": module_name,
                                                  "__doc__": f"{base_name or base.__name__} with {SCHEDULES[suffix]}."})
    return variants
