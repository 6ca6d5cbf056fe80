"""The ``gradkern`` command's tools: ``bench``, ``demo``, ``report``, ``info`` and the classic
training cases they run. They use the library through its public API; the library never
imports them, so ``import gradkern`` loads neither matplotlib nor the demo."""
