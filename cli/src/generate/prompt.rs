//! A prompt as token ids and the tokens that end its reply: raw text continued as is, or a conversation rendered
//! through the chat template with the assistant's turn opened. Shared by `--prompt`/`--chat` and `--prompts`, so a
//! line of a prompts file tokenizes exactly as the same prompt given alone.

use crate::finetune::TemplateArg;
use anyhow::{anyhow, bail, Result};
use qlora_models::data::jsonl::Message;
use qlora_models::data::template::ChatTemplate;
use qlora_models::formats::tokenizer::{SpecialToken, Tokenizer};
use std::path::Path;

/// End-of-turn tokens of the common chat formats (ChatML, Llama 3, Gemma): a chat reply stops at whichever the
/// vocabulary has, even when generation_config.json lists only the plain EOS.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

/// A tokenized prompt.
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Sorted, without duplicates.
    pub stop_tokens: Vec<u32>,
}

pub struct Prompter<'a> {
    tokenizer: &'a Tokenizer,
    /// The chat template, or why there is none: only a chat needs it, so a raw prompt never fails on it.
    template: std::result::Result<ChatTemplate, String>,
}

impl<'a> Prompter<'a> {
    /// `chat_template` overrides the tokenizer's own template from `model_dir`.
    pub fn new(tokenizer: &'a Tokenizer, model_dir: &Path, chat_template: Option<TemplateArg>) -> Self {
        let text = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.text.clone()).unwrap_or_default();
        let (bos, eos) = (text(&tokenizer.bos), text(&tokenizer.eos));
        let template = match (chat_template, &tokenizer.chat_template) {
            (Some(t), _) => Ok(ChatTemplate::builtin(t.builtin(), &bos, &eos)),
            (None, Some(src)) => {
                ChatTemplate::new(src, &bos, &eos).map_err(|e| format!("{}: {e}", model_dir.display()))
            }
            (None, None) => Err(format!(
                "{} has no chat template; pass --chat-template (llama3, llama2, gemma or chatml) or use a raw prompt",
                model_dir.display()
            )),
        };
        Prompter { tokenizer, template }
    }

    /// Raw text to continue, BOS added as the tokenizer's config says.
    pub fn raw(&self, text: &str) -> Result<Encoded> {
        Ok(self.encoded(self.tokenizer.encode(text, true)?, false))
    }

    /// A conversation; its reply stops at the end of the assistant's turn too.
    pub fn chat(&self, messages: &[Message]) -> Result<Encoded> {
        let template = self.template.as_ref().map_err(|e| anyhow!("{e}"))?;
        if messages.is_empty() {
            bail!("a chat needs at least one message");
        }
        let rendered = template.render(messages, true).map_err(|e| anyhow!(e))?;
        // The template writes BOS itself.
        Ok(self.encoded(self.tokenizer.encode(&rendered, false)?, true))
    }

    fn encoded(&self, ids: Vec<u32>, chat: bool) -> Encoded {
        let t = self.tokenizer;
        let mut stop_tokens = t.stop_ids();
        stop_tokens.extend(t.eos.as_ref().map(|t| t.id));
        if chat {
            stop_tokens.extend(END_OF_TURN.iter().filter_map(|s| t.token_to_id(s)));
        }
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Encoded { ids, stop_tokens }
    }
}
