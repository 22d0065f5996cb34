# make demo: offline tiny pipeline + data, a short training run, and where the results are.
# make test: creates both environments (.venv for PyTorch, .venv-flax for JAX) and runs both test suites.
PYTHON ?= python3
VENV := .venv
VENV_FLAX := .venv-flax
DEMO := demo_output

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt pytest
	touch $@

$(VENV_FLAX)/.installed: requirements_flax.txt
	$(PYTHON) -m venv $(VENV_FLAX)
	$(VENV_FLAX)/bin/pip install --quiet --upgrade pip
	$(VENV_FLAX)/bin/pip install --quiet -r requirements_flax.txt pytest
	touch $@

# Both suites: the PyTorch scripts in .venv, the Flax twins in .venv-flax (their tests also use .venv).
test: $(VENV)/.installed $(VENV_FLAX)/.installed
	$(VENV)/bin/python -m pytest tests -q --durations=10
	$(VENV_FLAX)/bin/python -m pytest tests_flax -q --durations=10

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python tests/tiny_sd.py --output_dir $(DEMO)/assets --num_images 16
	rm -rf $(DEMO)/text_to_image $(DEMO)/textual_inversion
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  train_text_to_image.py \
	  --pretrained_model_name_or_path $(DEMO)/assets/pipeline --train_data_dir $(DEMO)/assets/images \
	  --resolution 64 --random_flip --train_batch_size 4 --max_train_steps 40 --learning_rate 1e-3 --lr_warmup_steps 4 \
	  --snr_gamma 5.0 --use_ema --checkpointing_steps 20 --checkpoints_total_limit 2 --seed 0 \
	  --validation_prompts "a red circle" "a blue square" --validation_epochs 5 \
	  --output_dir $(DEMO)/text_to_image
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  textual_inversion.py \
	  --pretrained_model_name_or_path $(DEMO)/assets/pipeline --train_data_dir $(DEMO)/assets/concept \
	  --placeholder_token "<sun>" --initializer_token circle --num_vectors 2 --resolution 64 --repeats 10 \
	  --train_batch_size 4 --max_train_steps 30 --learning_rate 5e-2 --lr_warmup_steps 0 --snr_gamma 5.0 --seed 0 \
	  --checkpointing_steps 15 --save_steps 15 --validation_prompt "a photo of a <sun>" --num_validation_images 2 \
	  --validation_steps 15 --output_dir $(DEMO)/textual_inversion
	@echo
	@echo "text_to_image pipeline:     $(DEMO)/text_to_image   (StableDiffusionPipeline.from_pretrained loads it)"
	@echo "text_to_image validation:   $$(ls $(DEMO)/text_to_image/validation/*.png | tr '\n' ' ')"
	@echo "text_to_image checkpoints:  $$(ls -d $(DEMO)/text_to_image/checkpoint-* | tr '\n' ' ')"
	@echo "textual_inversion embeds:   $(DEMO)/textual_inversion/learned_embeds.safetensors   (pipe.load_textual_inversion loads it)"
	@echo "textual_inversion validation: $$(ls $(DEMO)/textual_inversion/validation/*.png | tr '\n' ' ')"

clean:
	rm -rf $(DEMO)
