"""Training from scratch: UNet (flow matching), asymmetric VAE, small text encoder; export and push (issue 4)."""
