# make demo: offline tiny pipeline + data, a short training run, and where the results are.
# make test: creates the environment(s) and runs the whole test suite.
PYTHON ?= python3
VENV := .venv
DEMO := demo_output

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt pytest
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests -q --durations=10

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python tests/tiny_sd.py --output_dir $(DEMO)/assets --num_images 16
	rm -rf $(DEMO)/text_to_image
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	  train_text_to_image.py \
	  --pretrained_model_name_or_path $(DEMO)/assets/pipeline --train_data_dir $(DEMO)/assets/images \
	  --resolution 64 --random_flip --train_batch_size 4 --max_train_steps 40 --learning_rate 1e-3 --lr_warmup_steps 4 \
	  --snr_gamma 5.0 --use_ema --checkpointing_steps 20 --checkpoints_total_limit 2 --seed 0 \
	  --validation_prompts "a red circle" "a blue square" --validation_epochs 5 \
	  --output_dir $(DEMO)/text_to_image
	@echo
	@echo "Pipeline:          $(DEMO)/text_to_image   (StableDiffusionPipeline.from_pretrained loads it)"
	@echo "Validation images: $$(ls $(DEMO)/text_to_image/validation/*.png | tr '\n' ' ')"
	@echo "Checkpoints:       $$(ls -d $(DEMO)/text_to_image/checkpoint-* | tr '\n' ' ')"

clean:
	rm -rf $(DEMO)
