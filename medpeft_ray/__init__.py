"""medpeft_ray: PEFT hyperparameter search for medical vision foundation models on Ray."""

__version__ = "0.1.0"
