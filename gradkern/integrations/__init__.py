"""gradkern inside the frameworks people train with. Each module imports its framework when it
is imported itself, never when gradkern is:

* :mod:`gradkern.integrations.lightning`: ``GradkernCallback``, a Lightning callback;
* :mod:`gradkern.integrations.transformers`: ``GradkernCallback``, a ``TrainerCallback``;
* :mod:`gradkern.integrations.accelerate`: ``use_gradkern(accelerator)``, so that Accelerate
  (and the Hugging Face Trainer, which clips through it) clips with gradkern.

The trackers' sinks are :class:`gradkern.sinks.WandB` and :class:`gradkern.sinks.MLflow`.
"""
