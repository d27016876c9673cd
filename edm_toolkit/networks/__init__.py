"""Backbone networks F(x, c_noise, class_labels, augment_labels) with their original state_dict layouts."""
