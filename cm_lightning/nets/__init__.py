"""Networks and their contract: the ``net`` argument (contract), the UNet, the parametrisations that wrap any
network (preconditioning: f_θ, D_φ), and the MNIST feature network of FID. Imports only ``core``."""
