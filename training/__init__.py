"""Training UML: the tools that fit what a model bundle's engine (``umlcore``) applies. Run them from the repository
root as modules (``docs/training.md``; the shipped bundle's recipe: ``recipes/uml-breast-dce-small.md``):

- ``python -m training.train``: train the UML network (settings: a JSON config in ``configs/``, flags override it);
- ``python -m training.train_reader``: train the lesion reader (the second network that checks and reads lesions);
- ``python -m training.export``: assemble a model bundle from a network run, a reader run and an existing bundle;
- ``python -m training.evaluate``: measure a bundle end to end on held-out cases (figures + one row per case);
- ``python -m training.fit``: fit a bundle's thresholds and calibrations on evaluated validation cases.

Library modules: ``splits`` (the seed ranges of the synthetic splits), ``config`` (typed settings from JSON and
flags), ``cases`` (synthetic cases as a user would load them), ``slices`` (training batches), ``fitting``
(logistic fits and threshold choices), ``workers`` (process pools), ``datasets`` (adapters for real datasets).
"""
