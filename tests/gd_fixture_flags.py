"""What the 16x16 guided-diffusion fixture weights cannot tell, in the original flag syntax (shared by tests).

gd_unet_legacy under gd_sampling's diffusion (cosine, 1000 steps, no rescaling), and the attention-pool
classifier gd_classifier_attention (10 classes).
"""

MODEL_FLAGS = ("--image_size 16 --num_heads 2 --use_new_attention_order False --noise_schedule cosine "
               "--diffusion_steps 1000 --rescale_timesteps False")
CLASSIFIER_FLAGS = ("--image_size 16 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions "
                    "16,8 --classifier_pool attention --num_head_channels 16 --channel_mult 1,2")
NUM_CLASSES = 10
