"""latmix: LATMiX reproduction and MX-quantization experiment harness."""
