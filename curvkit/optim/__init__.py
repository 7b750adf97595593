"""Second-order optimizers (AdaHessian, Sophia) built on the Hessian engine."""
