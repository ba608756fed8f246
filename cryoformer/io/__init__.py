"""cryoformer.io"""
