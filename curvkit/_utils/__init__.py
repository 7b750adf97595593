"""Helpers shared by curvkit's subpackages: private to curvkit, public to its subpackages.

- :mod:`.random`: seeds and generators (the global RNG is never touched), probe matrices;
- :mod:`.batches`: one batch or many, batch sizes, moving batches to a device;
- :mod:`.borrow`: evaluating a user's model without changing it (parameter selection, borrowed loss,
  module modes, twice-differentiable kernels);
- :mod:`.layers`: which modules are weight layers, and their parameter names;
- :mod:`.targets`: class-index targets of cross-entropy and NLL losses, checked before torch indexes with them;
- :mod:`.stats`: running means and standard errors;
- :mod:`.progress`: progress bars.
"""
