"""Helpers several methods share, apart from the core and from any one method.

- :mod:`~cltk.methods.kit.zero_view`: this rank's fp32 partitions under ZeRO 0/1/2/3 (A-GEM, DAS, EWC,
  SPG);
- :mod:`~cltk.methods.kit.grads`: this rank's reduced gradient between backward and step, and the
  gradient of an extra batch taken and dropped without a step (A-GEM's reference gradient, EWC's
  per-sample Fisher);
- :mod:`~cltk.methods.kit.update_blend`: the update blend around the optimizer step (DAS, SPG);
- :mod:`~cltk.methods.kit.teacher`: the frozen previous stage as a second engine (soft targets,
  distillation);
- :mod:`~cltk.methods.kit.weight_average`: copies of this rank's partitions, interpolated and written back
  into the model (merge, EMA);
- :mod:`~cltk.methods.kit.soft_losses`: soft-target and distillation losses, pure functions on the
  kernel of :mod:`cltk.losses`.

The kit sits between the core and the methods: it imports the core, methods import it, and neither the
core nor the kit imports a method.
"""
