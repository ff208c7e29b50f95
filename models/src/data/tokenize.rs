//! Records → token ids and labels: chat through the chat template with loss on assistant turns only (or on
//! everything), prompt/completion with loss on the completion, instruction rows as a one-turn chat, plain text
//! fully trained, pre-tokenized rows as given.

use super::jsonl::{Message, Record};
use super::pack::Example;
use super::template::{BuiltinTemplate, ChatTemplate};
use crate::formats::tokenizer::Tokenizer;

const IGNORE: i32 = -100;

/// Turns records into examples for one tokenizer.
pub struct Formatter<'a> {
    tokenizer: &'a Tokenizer,
    template: Option<ChatTemplate>,
    train_on_everything: bool,
    /// End-of-turn strings that belong to an assistant turn (the model must learn to emit them).
    end_markers: Vec<String>,
}

impl<'a> Formatter<'a> {
    /// `builtin` overrides the tokenizer's own chat template; without either, chat rows are refused.
    pub fn new(
        tokenizer: &'a Tokenizer,
        builtin: Option<BuiltinTemplate>,
        train_on_everything: bool,
    ) -> Result<Self, String> {
        let text = |t: &Option<crate::formats::tokenizer::SpecialToken>| {
            t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
        };
        let (bos, eos) = (text(&tokenizer.bos), text(&tokenizer.eos));
        let template = match (builtin, &tokenizer.chat_template) {
            (Some(b), _) => Some(ChatTemplate::builtin(b, &bos, &eos)),
            (None, Some(src)) => Some(ChatTemplate::new(src, &bos, &eos)?),
            (None, None) => None,
        };
        let mut end_markers: Vec<String> =
            tokenizer.stop_ids().iter().filter_map(|&id| tokenizer.id_to_token(id)).collect();
        end_markers.extend(["<|eot_id|>", "<end_of_turn>", "<|im_end|>"].map(String::from));
        if !eos.is_empty() {
            end_markers.push(eos);
        }
        end_markers.dedup();
        Ok(Formatter { tokenizer, template, train_on_everything, end_markers })
    }

    /// The ids of `text`, with the tokenizer's own special tokens (BOS) when `add_special`.
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i32>, String> {
        let ids = self.tokenizer.encode(text, add_special).map_err(|e| e.to_string())?;
        Ok(ids.into_iter().map(|i| i as i32).collect())
    }

    fn eos(&self) -> Vec<i32> {
        self.tokenizer.eos.as_ref().map(|t| vec![t.id as i32]).unwrap_or_default()
    }

    fn chat(&self, messages: &[Message]) -> Result<Example, String> {
        let Some(template) = &self.template else {
            return Err("chat rows need a chat template: the tokenizer has none; pass --chat-template \
                        (llama3, llama2, gemma or chatml)"
                .into());
        };
        let markers: Vec<&str> = self.end_markers.iter().map(String::as_str).collect();
        let (text, spans) = template.render_with_assistant_spans(messages, &markers)?;
        if spans.is_empty() && !self.train_on_everything {
            return Err("the conversation has no assistant message to learn".into());
        }
        // Tokenize piece by piece at the span boundaries (turn markers), so every token is wholly inside or
        // outside an assistant turn.
        let mut ex = Example { ids: vec![], labels: vec![] };
        let mut cursor = 0;
        let push = |range: std::ops::Range<usize>, trained: bool, ex: &mut Example| -> Result<(), String> {
            if range.is_empty() {
                return Ok(());
            }
            let ids = self.encode(&text[range], false)?;
            ex.labels.extend(ids.iter().map(|&i| if trained || self.train_on_everything { i } else { IGNORE }));
            ex.ids.extend(ids);
            Ok(())
        };
        for span in &spans {
            push(cursor..span.start, false, &mut ex)?;
            push(span.clone(), true, &mut ex)?;
            cursor = span.end;
        }
        push(cursor..text.len(), false, &mut ex)?;
        Ok(ex)
    }

    /// One record as an example (the error says what is wrong with the record).
    pub fn example(&self, record: &Record) -> Result<Example, String> {
        match record {
            Record::Chat(messages) => self.chat(messages),
            Record::Instruction { instruction, input, output } => {
                let prompt = if input.is_empty() { instruction.clone() } else { format!("{instruction}\n\n{input}") };
                let messages = [
                    Message { role: "user".into(), content: prompt },
                    Message { role: "assistant".into(), content: output.clone() },
                ];
                self.chat(&messages)
            }
            Record::PromptCompletion { prompt, completion } => {
                let p = self.encode(prompt, true)?;
                let mut c = self.encode(completion, false)?;
                c.extend(self.eos());
                let mut labels: Vec<i32> =
                    p.iter().map(|&i| if self.train_on_everything { i } else { IGNORE }).collect();
                labels.extend(&c);
                let mut ids = p;
                ids.extend(c);
                Ok(Example { ids, labels })
            }
            Record::Text(text) => {
                let mut ids = self.encode(text, true)?;
                ids.extend(self.eos());
                Ok(Example { labels: ids.clone(), ids })
            }
            Record::Tokens { input_ids, labels } => {
                let vocab = self.tokenizer.vocab_size();
                if let Some(bad) = input_ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
                    return Err(format!("input id {bad} is outside the vocabulary ({vocab} tokens)"));
                }
                Ok(Example { ids: input_ids.clone(), labels: labels.clone().unwrap_or_else(|| input_ids.clone()) })
            }
        }
    }
}
