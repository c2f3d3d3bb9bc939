"""The model: its directory (`spec`, no torch), the classifier, training, calibration,
evaluation, labelled sets and explanations."""
