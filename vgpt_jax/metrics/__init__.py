"""Video prediction metrics: Physics-IQ (physics_iq.py), PSNR/SSIM (video.py), FVD (fvd.py)."""
